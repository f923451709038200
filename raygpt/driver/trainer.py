"""The TorchTrainer the launcher builds for a run, the signal handlers it trains under, and a failed or
interrupted run told in one line (where it can continue from), or a finished one summarized."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from raygpt.config.schema import TrainConfig, score_order
from raygpt.core import checkpoint
from raygpt.driver.plan import RunPlan, ray_checkpoint_dirs, written_after_ray
from raygpt.errors import RaygptError
from raygpt.ray_compat import with_sigint_handler
from raygpt.storage.uri import join_uri, read_small_file, storage_root
from raygpt.worker.preemption import Terminated, ask_workers_to_stop
from raygpt.worker.reporting import EVAL_NAME


def interruptible(trainer_class, hand_sigterm_to_workers: Callable[[], bool] | None = None):
    """The trainer class with raygpt's Ctrl-C handler in place of the one Ray Train's fit() installs.

    Ray's asks the controller to abort and then exits the process itself, so the launcher could say
    nothing about what was saved. This one asks the controller to abort, waits (ABORT_TIMEOUT_S at most)
    until the workers have stopped, so that no checkpoint is written after the launcher names the latest
    one, and then raises KeyboardInterrupt for the launcher's last line; a second Ctrl-C stops waiting.
    SIGTERM does the same, and raises Terminated, unless `hand_sigterm_to_workers` hands it to them:
    then they checkpoint and end the run, fit() returns, and the trainer's `stopped_by_sigterm` says why.
    Ray installs its handler only from the main thread (not under Tune), and so is this one."""

    def install(trainer, controller) -> None:
        import ray

        stopping = False

        def on_sigint(signum, frame):
            nonlocal stopping
            stop = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
            if stopping:
                raise stop
            stopping = True
            if signum == signal.SIGTERM and hand_sigterm_to_workers is not None and hand_sigterm_to_workers():
                trainer.stopped_by_sigterm = True
                print("terminating: the workers save a checkpoint and end the run (SIGTERM again not to wait)",
                      file=sys.stderr, flush=True)  # fmt: skip
                return
            print("interrupting: stopping the workers (Ctrl-C again not to wait)", file=sys.stderr, flush=True)
            try:
                ray.get(controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass  # the controller is gone already, or too slow: exiting ends the run's actors too
            raise stop

        signal.signal(signal.SIGINT, on_sigint)
        signal.signal(signal.SIGTERM, on_sigint)

    return with_sigint_handler(trainer_class, install)


ABORT_TIMEOUT_S = 30


def in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def build_trainer(cfg: TrainConfig, plan: RunPlan, callbacks=None, train_loop: Callable[[dict], None] | None = None):
    """The run's TorchTrainer; each worker runs `train_loop` (default: raygpt.worker.loop.train_loop_per_worker)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raygpt.worker.loop import train_loop_per_worker
    from raygpt.worker.session import NoTeardownTorchConfig
    from raygpt.worker.startup import FailureClock
    from raygpt.worker.validation import validation_config

    # num_workers=0 is Ray Train's local mode: train_loop_per_worker runs in this process.
    workers = (plan.num_workers, plan.max_workers) if plan.max_workers else plan.num_workers  # (min, max): elastic
    scaling = ScalingConfig(
        num_workers=0 if cfg.local_mode else workers,
        use_gpu=plan.use_gpu,
        resources_per_worker={"CPU": plan.cpus_per_worker, **({"GPU": 1} if plan.use_gpu else {})},
        # A field of Ray's elastic ScalingConfig only (older Rays lack it): passed for elastic runs alone.
        **({"elastic_resize_monitor_interval_s": cfg.elastic_resize_interval_s} if plan.max_workers else {}),
    )
    run_config = RunConfig(
        name=plan.run_name,
        storage_path=cfg.storage_path or None,
        failure_config=FailureConfig(
            max_failures=cfg.max_failures, max_preemption_failures=cfg.max_preemption_failures
        ),
        checkpoint_config=CheckpointConfig(
            num_to_keep=cfg.checkpoints_to_keep,
            checkpoint_score_attribute=cfg.checkpoint_score,
            checkpoint_score_order=score_order(cfg.checkpoint_score),
        ),
        callbacks=[*(callbacks or []), FailureClock(plan.launch_id)],
    )
    return interruptible(TorchTrainer, functools.partial(ask_workers_to_stop, plan.launch_id))(
        train_loop or train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "plan": dataclasses.asdict(plan)},
        torch_config=NoTeardownTorchConfig(backend=cfg.backend if plan.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=run_config,
        validation_config=validation_config(cfg, plan.run_name),  # None: no evals, or local mode (in the loop)
    )


class RunFailed(Exception):
    """A run that started and failed; the message is one line (exit status 1, not a refusal's 2)."""


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM during a run; the message says where it can continue from."""

    def __init__(self, message: str, terminated: bool = False):
        super().__init__(message)
        self.terminated = terminated  # SIGTERM, not Ctrl-C


def where_to_continue(cfg: TrainConfig, plan: RunPlan, not_saved: str = "") -> str:
    """What was saved and how to go on, for the last line of a failed or interrupted run; `not_saved`: why
    the stop itself saved nothing (preemption.not_saved), said first."""
    ray_dirs = ray_checkpoint_dirs(cfg, plan.run_name)
    out_ckpt = Path(cfg.out_dir) / checkpoint.CKPT_NAME
    before = f"{not_saved}; " if not_saved else ""
    # The run's checkpoints as a rerun chooses among them (the latest iteration), the one it began from too.
    candidates = [
        *reversed(ray_dirs),
        *([out_ckpt] if out_ckpt.exists() and written_after_ray(out_ckpt, ray_dirs) else []),
    ]
    if plan.resume_from and plan.resume_from not in map(str, candidates):
        candidates.append(plan.resume_from)
    if not candidates:
        return f"{before}no checkpoint was saved yet"
    latest = checkpoint.by_iteration(candidates, checkpoint.iteration_of)[0]
    return f"{before}the latest checkpoint is {latest}: run the same command again to continue from it"


def worker_refusal(error: BaseException) -> RaygptError | None:
    """The RaygptError a worker raised, if that is what failed the run."""
    for failure in (getattr(error, "worker_failures", None) or {}).values():
        cause = getattr(failure, "cause", None) or failure
        if isinstance(cause, RaygptError):
            return cause
    return None


def root_cause(error: BaseException) -> str:
    """One line for a failed fit(): the first worker's own exception, not Ray's wrapping of it."""
    failures = getattr(error, "worker_failures", None) or {}
    for failure in failures.values():
        cause = getattr(failure, "cause", None) or failure
        text = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {text[-1] if text else ''}"
    from ray.train import TrainingFailedError

    text = str(error).strip().splitlines()
    if not isinstance(error, TrainingFailedError):  # local mode raises the loop's own exception
        return f"{type(error).__name__}: {text[-1] if text else ''}"
    return text[-1] if text else type(error).__name__


def summarize(result, cfg: TrainConfig) -> None:
    if cfg.eval_only:  # rank 0 may run on another machine: its numbers come through Ray storage
        where = join_uri(storage_root(cfg.storage_path), cfg.run_name or Path(cfg.out_dir).name, EVAL_NAME)
        evaluated = json.loads(read_small_file(where))
        print(
            f"eval at iter {evaluated['iter']}: train loss {evaluated['train_loss']:.4f}, "
            f"val loss {evaluated['val_loss']:.4f} (written to {where}, and to out_dir on rank 0's machine)"
        )
        return
    if cfg.local_mode:  # no Ray storage: the checkpoint lives in out_dir only
        metrics = result.metrics or {}
        if "best_val_loss" not in metrics:
            return
        if result.checkpoint is not None:  # the file is named only where this run wrote it
            print(f"best val loss {metrics['best_val_loss']:.4f}: {Path(cfg.out_dir) / checkpoint.CKPT_NAME}")
        else:
            print(f"best val loss {metrics['best_val_loss']:.4f}; {no_checkpoint_saved(cfg, metrics)}")
        return
    best = result.best_checkpoints
    if best:
        ckpt, metrics = min(best, key=lambda pair: pair[1].get("val_loss", float("inf")))
        print(f"best val loss {metrics['val_loss']:.4f} at iter {metrics['iter']}: {ckpt.path}")
    if best and cfg.checkpoint_score != "val_loss":
        print(best_by_score(best, cfg.checkpoint_score))
    if result.checkpoint is not None:
        print(f"latest checkpoint: {result.checkpoint.path}")
    elif result.metrics:
        print(no_checkpoint_saved(cfg, result.metrics))
    print(f"run folder: {result.path}")


def best_by_score(best: list, score: str) -> str:
    """The line naming the kept checkpoint of the best `score` (an eval's metric); NaN: not validated."""
    scored = [(ckpt, metrics) for ckpt, metrics in best if math.isfinite(metrics.get(score, math.nan))]
    if not scored:
        return f"no kept checkpoint has a {score} (their evals did not end)"
    sign = 1 if score_order(score) == "min" else -1
    ckpt, metrics = min(scored, key=lambda pair: sign * pair[1][score])
    return f"best {score} {metrics[score]:.4f} at iter {metrics['iter']}: {ckpt.path}"


def no_checkpoint_saved(cfg: TrainConfig, metrics: dict) -> str:
    """What the end of a run that saved no checkpoint says instead of naming one."""
    if metrics.get("iter") == 0:  # checkpoints hold training: none is saved at iter 0
        return f"no checkpoint was saved: the run ended at iter 0, which is never saved (max_iters={cfg.max_iters})"
    return "this run saved no new checkpoint"
