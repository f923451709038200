"""The evals of each checkpoint (core/evals.py: HellaSwag-style multiple choice, bits per byte), and the one
home of Ray Train's asynchronous validation API (alpha in Ray 2.60): ValidationConfig on the trainer,
report(..., validation=True), get_all_reported_checkpoints.

In a Ray Train run, each checkpoint is reported with a request to validate it: Ray runs `validate_checkpoint`
in a task of its own (eval_cpus, eval_gpus), one checkpoint at a time, while training goes on, and merges
the task's metrics into the checkpoint's. The examples travel with the task (the launcher read them), so a
node needs only what training needs: the dataset, for the tokenizer and bpb. Rank 0 asks Ray for the
reported checkpoints at each eval, through the thread that orders the worker's Ray calls, and shows each
result that has arrived (RayValidations); at the run's end it waits for the outstanding ones. Each task
also leaves its result in the run folder's validations/ (storage_path/run_name): Ray deletes a validated
checkpoint that ranks below checkpoints_to_keep at once, its metrics with it, before rank 0 could ask.

Where Ray runs no validation tasks (local mode, a one-worker Tune trial: no Train controller), the same
evals run in the loop on rank 0's model at each checkpoint, and training waits for them (InLoopEvals).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from raygpt.config.schema import BPB, HELLASWAG, HELLASWAG_CACHE, HELLASWAG_FILE, TrainConfig, eval_tasks
from raygpt.core import checkpoint, evals
from raygpt.core.model import GPT
from raygpt.core.saved_model import checkpoint_file, dataset_meta, load_checkpoint_model, tokenizer_for
from raygpt.core.tokenizer import Tokenizer, load_meta
from raygpt.storage.datasets import dataset_uri, default_cache_root, stage_dataset
from raygpt.storage.uri import (
    StorageError,
    is_uri,
    join_uri,
    list_files,
    read_small_file,
    storage_root,
    write_small_file,
)
from raygpt.worker.reporting import VALIDATION_KEY

END_WAIT_POLL_S = 2.0  # at the run's end, between rank 0's questions to Ray
END_WAIT_PATIENCE_S = 600.0  # at the run's end, rank 0 stops waiting when no validation ends for this long
RESULTS_FOLDER = "validations"  # in the run folder: iter_<N>.json, one validation's result each


# ---- what is scored, and how ---------------------------------------------------------------------------


def task_file(source: str) -> Path:
    """The jsonl an eval reads: HellaSwag's val split in the cache the launcher fetched it to, or the file."""
    return Path(HELLASWAG_CACHE).expanduser() / HELLASWAG_FILE if source == HELLASWAG else Path(source)


def read_eval_examples(cfg: TrainConfig) -> dict[str, list[evals.Example]]:
    """Each multiple-choice eval's examples (the first eval_examples of its file), by name."""
    limit = cfg.eval_examples or None
    tasks = eval_tasks(cfg.evals)
    return {name: evals.read_examples(task_file(source), limit) for name, source in tasks.items() if source != BPB}


def dataset_folder(data_dir: str, dataset: str) -> Path:
    """The local folder of the dataset's val.bin: data_dir's own, or this node's copy of one at a URI
    (staged once per node, as the training workers stage it)."""
    if not is_uri(data_dir):
        return Path(data_dir) / dataset
    return stage_dataset(dataset_uri(data_dir, dataset), default_cache_root(), progress=lambda line: None)


def score(model: GPT, tokenizer: Tokenizer, examples: dict[str, list[evals.Example]], val_dir: Path | None,
          windows: int | None, dtype: str, batch_size: int) -> dict:  # fmt: skip
    """The metrics of a model: <name>/acc and <name>/acc_norm of each multiple-choice eval, and bpb of
    val_dir's val.bin (its first `windows` windows; None: all) where val_dir is given."""
    metrics = {}
    for name, task_examples in examples.items():
        result = evals.evaluate_multiple_choice(model, tokenizer, task_examples, dtype, batch_size)
        metrics[f"{name}/acc"], metrics[f"{name}/acc_norm"] = result["acc"], result["acc_norm"]
    if val_dir is not None:
        tokens = np.memmap(val_dir / "val.bin", dtype=np.uint16, mode="r")
        byte_lengths = evals.token_byte_lengths(tokenizer, model.config.vocab_size)
        result = evals.bits_per_byte(model, tokens, byte_lengths, dtype, batch_size, windows)
        metrics[BPB] = result["bits_per_byte"]
    return metrics


def validate_checkpoint(checkpoint_to_score, examples: dict, data_dir: str, dataset: str, bpb: bool,
                        windows: int | None, threads: int, use_gpu: bool, results: str) -> dict:  # fmt: skip
    """The validation task Ray runs on a reported checkpoint: its iter and the evals' metrics, also left in
    the `results` folder for rank 0. `examples`: name -> Example fields (plain values, as Ray's task config
    keeps them)."""
    started = time.perf_counter()
    torch.set_num_threads(threads)  # Ray starts task processes with one thread
    device = torch.device("cuda" if use_gpu else "cpu")  # Ray hands the task its GPU as the only visible one
    with checkpoint_to_score.as_directory() as folder:
        iter_num = checkpoint.iteration_of(Path(folder))
        model, config, trained_on = load_checkpoint_model(checkpoint_file(Path(folder)))
    tokenizer = tokenizer_for(model.config.vocab_size, *dataset_meta(config, None), trained_on)
    examples = {name: [evals.Example(**{**e, "endings": tuple(e["endings"])}) for e in task] for name, task in
                examples.items()}  # fmt: skip
    val_dir = dataset_folder(data_dir, dataset) if bpb else None
    metrics = score(model.to(device), tokenizer, examples, val_dir, windows, "auto", evals.DEFAULT_BATCH_SIZE)
    result = {"iter": iter_num, **metrics, VALIDATION_KEY: time.perf_counter() - started}
    try:
        write_small_file(join_uri(results, f"iter_{iter_num}.json"), json.dumps(result))
    except (StorageError, OSError) as e:  # Ray still has the result: only a deleted checkpoint's is lost
        print(f"warning: cannot keep the validation of iter {iter_num} in {results}: {e}", file=sys.stderr)
    return result


def results_folder(cfg: TrainConfig, run_name: str) -> str:
    """Where the validation tasks leave their results: validations/ in the run's Ray run folder."""
    return join_uri(storage_root(cfg.storage_path), run_name, RESULTS_FOLDER)


def stored_results(results: str) -> list[dict]:
    """The results the validation tasks left in `results`, by iteration; an unreadable one is skipped (the
    task's result still reaches Ray)."""
    found = []
    try:
        for name in list_files(results, "iter_", ".json"):
            data = read_small_file(join_uri(results, name))
            record = json.loads(data) if data is not None else None
            if isinstance(record, dict) and isinstance(record.get("iter"), int):
                found.append(record)
    except (StorageError, ValueError):
        pass
    return sorted(found, key=lambda record: record["iter"])


# ---- where the evals run -------------------------------------------------------------------------------


def runs_as_ray_tasks(cfg: TrainConfig, validation_tasks: bool = True) -> bool:
    """Whether Ray validates the run's checkpoints in tasks: evals asked for, and a Ray Train run (not local
    mode; not a one-worker Tune trial's own process, `validation_tasks` False)."""
    return bool(eval_tasks(cfg.evals)) and not cfg.local_mode and validation_tasks


def validation_config(cfg: TrainConfig, run_name: str):
    """The trainer's ray.train.ValidationConfig (None where Ray validates nothing): validate_checkpoint with
    the examples read here, in a task of eval_cpus CPUs and eval_gpus GPUs."""
    if not runs_as_ray_tasks(cfg):
        return None
    from ray.train import ValidationConfig, ValidationTaskConfig

    examples = {name: [dataclasses.asdict(e) for e in task] for name, task in read_eval_examples(cfg).items()}
    arguments = dict(examples=examples, data_dir=cfg.data_dir, dataset=cfg.dataset,
                     bpb=BPB in eval_tasks(cfg.evals), windows=cfg.eval_examples or None,
                     threads=max(1, int(cfg.eval_cpus)), use_gpu=cfg.eval_gpus > 0,
                     results=results_folder(cfg, run_name))  # fmt: skip
    return ValidationConfig(
        validate_checkpoint,
        ValidationTaskConfig(fn_kwargs=arguments),
        ray_remote_kwargs={"num_cpus": cfg.eval_cpus, "num_gpus": cfg.eval_gpus},
    )


def reporting_checkpoints_for_validation(report: Callable, cfg: TrainConfig) -> Callable:
    """report(metrics, checkpoint=None), asking Ray to validate each checkpoint. Where checkpoints are ranked
    by an eval's metric, a checkpoint carries it as NaN until its validation replaces it: Ray ranks NaN last
    (a pending checkpoint is never deleted), where a missing one it would log an error for at each ranking."""
    placeholder = {} if cfg.checkpoint_score == "val_loss" else {cfg.checkpoint_score: math.nan}

    def report_checkpoint(metrics: dict, checkpoint=None) -> None:
        if checkpoint is None:
            report(metrics, checkpoint=None)
        else:
            report({**placeholder, **metrics}, checkpoint=checkpoint, validation=True)

    return report_checkpoint


def describe(cfg: TrainConfig, in_loop_because: str | None) -> str:
    """The line that says at the start where the evals run."""
    names = ", ".join(eval_tasks(cfg.evals))
    if in_loop_because:
        return (f"evals {names} run in the loop at each checkpoint ({in_loop_because}): training waits for "
                "them")  # fmt: skip
    gpus = f" and {cfg.eval_gpus:g} GPU{'s' if cfg.eval_gpus != 1 else ''}" if cfg.eval_gpus else ""
    return (f"evals {names}: a Ray task of {cfg.eval_cpus:g} CPU{'s' if cfg.eval_cpus != 1 else ''}{gpus} "
            "scores each checkpoint while training goes on")  # fmt: skip


def checkpoint_evals(cfg: TrainConfig, run_name: str, validation_tasks: bool, say: Callable[[str], None],
                     reporter, calls, model: GPT, dataset_dir: Path) -> CheckpointEvals:  # fmt: skip
    """What scores the run's checkpoints on this worker, said in one line at the start: rank 0's view of
    Ray's validation tasks, or the evals in the loop where Ray runs none (`validation_tasks` False: a
    one-worker Tune trial)."""
    if not eval_tasks(cfg.evals):
        return CheckpointEvals()
    if runs_as_ray_tasks(cfg, validation_tasks):
        say(describe(cfg, None))
        if not reporter.is_rank_zero:
            return CheckpointEvals()
        results = results_folder(cfg, run_name)
        return RayValidations(calls, reporter.validation, say, reporter.validated_iters(), results)
    why = "local mode has no Ray tasks" if cfg.local_mode else "a one-worker Tune trial has no Ray validation tasks"
    say(describe(cfg, why))
    tokenizer = tokenizer_for(model.config.vocab_size, load_meta(dataset_dir), str(dataset_dir))
    return InLoopEvals(cfg, model, tokenizer, dataset_dir, reporter.validation)


class CheckpointEvals:
    """What the loop asks of the evals: at_eval() at each eval, before its report; at_checkpoint(metrics) ->
    the metrics to report with a checkpoint; finish() at the run's end (not at a stop on a notice, which
    must not wait). This one: no evals."""

    def at_eval(self) -> None:
        pass

    def at_checkpoint(self, metrics: dict) -> dict:
        return metrics

    def finish(self) -> None:
        pass


class InLoopEvals(CheckpointEvals):
    """The evals scored on rank 0's own model at each checkpoint, in the loop; the results join the
    checkpoint's reported metrics and are shown as Ray's validations are."""

    def __init__(self, cfg: TrainConfig, model: GPT, tokenizer: Tokenizer, dataset_dir: Path,
                 show: Callable[[dict], None]):  # fmt: skip
        self.model, self.tokenizer, self.show = model, tokenizer, show
        self.examples = read_eval_examples(cfg)
        self.val_dir = dataset_dir if BPB in eval_tasks(cfg.evals) else None
        self.windows, self.dtype = cfg.eval_examples or None, cfg.dtype
        self.batch_size = cfg.batch_size  # what fits beside training's own memory

    def at_checkpoint(self, metrics: dict) -> dict:
        started = time.perf_counter()
        scored = score(self.model, self.tokenizer, self.examples, self.val_dir, self.windows, self.dtype,
                       self.batch_size)  # fmt: skip
        result = {"iter": metrics["iter"], **scored, VALIDATION_KEY: time.perf_counter() - started}
        self.show(result)
        return {**metrics, **scored}


class RayValidations(CheckpointEvals):
    """Rank 0's view of Ray's validations: at each eval it asks Ray (get_all_reported_checkpoints, which is
    no collective: rank 0 alone may call it) for the reported checkpoints and shows each validation that
    has ended since, through `calls`, so the loop never waits. Before the eval's report: a validated
    checkpoint that the next report's ranking would delete is still there. `shown`: the iterations whose
    results an earlier process of the run has shown (its metrics.jsonl)."""

    def __init__(self, calls, show: Callable[[dict], None], say: Callable[[str], None], shown: set[int],
                 results: str):  # fmt: skip
        self.calls, self.show, self.say, self.shown, self.results = calls, show, say, set(shown), results
        self.warned_behind = False

    def at_eval(self) -> None:
        self.calls.submit(lambda: self.warn_if_behind(self.poll()))

    def finish(self) -> None:
        self.calls.submit(self.wait_for_outstanding)

    def poll(self) -> list[int]:
        """Show the validations that have ended; returns the iterations still waiting for theirs."""
        from ray.train import CheckpointConsistencyMode, ReportedCheckpointStatus, get_all_reported_checkpoints

        reported = get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
        # The tasks' own records first: one whose checkpoint Ray has deleted is there alone.
        for record in stored_results(self.results):
            if record["iter"] not in self.shown:
                self.shown.add(record["iter"])
                self.show(record)
        pending = []
        for item in sorted(reported, key=lambda item: item.metrics.get("iter", -1)):
            iter_num = item.metrics.get("iter")
            if iter_num in self.shown:
                continue
            if item.status == ReportedCheckpointStatus.PENDING_VALIDATION:
                pending.append(iter_num)
            elif item.status == ReportedCheckpointStatus.VALIDATED:
                self.shown.add(iter_num)
                self.show(item.metrics)
            elif item.status in (
                ReportedCheckpointStatus.VALIDATION_FAILED,
                ReportedCheckpointStatus.VALIDATION_TIMEOUT,
            ):
                self.shown.add(iter_num)
                how = "failed" if item.status == ReportedCheckpointStatus.VALIDATION_FAILED else "timed out"
                self.say(f"warning: the validation of iter {iter_num} {how} (Ray logs why); "
                         "its checkpoint keeps its training metrics")  # fmt: skip
        return pending

    def warn_if_behind(self, pending: list[int]) -> None:
        """Once, where a checkpoint's validation waits for another's when the next checkpoint comes."""
        if len(pending) > 1 and not self.warned_behind:
            self.warned_behind = True
            self.say(f"warning: validations fall behind training ({len(pending)} checkpoints wait; Ray runs one at "
                     "a time): give them more resources (eval_gpus, eval_cpus) or fewer examples (eval_examples); "
                     "the run's end waits for them")  # fmt: skip

    def wait_for_outstanding(self) -> None:
        """At the run's end: show the validations still to come as they end. A queue that stops moving
        (validations that cannot get their resources) is left to Ray, which still records them."""
        pending, said, last_change = self.poll(), False, time.monotonic()
        while pending:
            if not said:
                self.say(f"waiting for the validation of iter {', '.join(map(str, pending))}")
                said = True
            time.sleep(END_WAIT_POLL_S)
            still = self.poll()
            if still != pending:
                last_change = time.monotonic()
            elif time.monotonic() - last_change > END_WAIT_PATIENCE_S:
                self.say(f"warning: no validation ended in {END_WAIT_PATIENCE_S:.0f} s: not waiting for iter "
                         f"{', '.join(map(str, still))} (Ray still adds their metrics to the checkpoints)")  # fmt: skip
                return
            pending = still
