"""One reporter for what a run tells the world: the console line, WandB, out_dir/metrics.jsonl,
TensorBoard (worker/tensorboard.py) and ray.train.report.

Cadence: every log_interval a console line (rank 0), a WandB point, a metrics.jsonl line and TensorBoard
points; every eval the same, TensorBoard flushed, and ray.train.report (every rank, with rank 0's
checkpoint). Steps never go to ray.train.report: a report made within Ray's controller poll of the
previous one blocks until it is consumed, which would cost far more than a step.
"""

from __future__ import annotations

import json
import math
import secrets
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from raygpt.config.schema import eval_metrics, eval_tasks
from raygpt.storage.files import write_text_atomic
from raygpt.storage.uri import join_uri, write_small_file

EVAL_NAME = "eval.json"  # what an eval_only run found, in out_dir and in the run's folder in storage
METRICS_NAME = "metrics.jsonl"  # the run's loss history, in out_dir (MetricsLog)

# Reported metric -> its name in WandB and TensorBoard (nanoGPT's names where it has them).
WANDB_KEYS = {
    "loss": "train/loss",
    "val_loss": "val/loss",
    "train_loss": "eval/train_loss",
    "lr": "lr",
    "mfu": "mfu",
    "tokens_per_sec": "tokens/s",
    "tokens_seen": "tokens_seen",
    "peak_memory_gib": "peak_memory_gib",
    "grad_norm": "grad_norm",  # before clipping
    "clipped": "clipped",  # 1.0 where grad_norm was over grad_clip
    "nonfinite_skips": "nonfinite_skips",  # steps skipped so far by this process (core.step.NonFiniteGuard)
}
HISTORY_STEP_KEYS = ("iter", "loss", "lr", "time_ms", "tokens_per_sec", "mfu", "grad_norm")  # metrics.jsonl's
# What TensorBoard gets of a log step's metrics and of an eval's: each point once (lr is the step's).
BOARD_STEP_KEYS = ("loss", "lr", "mfu", "tokens_per_sec", "grad_norm", "clipped", "nonfinite_skips")
BOARD_EVAL_KEYS = ("train_loss", "val_loss", "peak_memory_gib")
WARMUP_STEPS = 5  # the first steps of a process (compile, allocator warm-up) are left out of MFU and the ETA


class Say:
    """The worker's one console channel: every line a run prints goes through it, on rank 0 (or, for a
    dataset's staging, the first worker of each node) and nowhere else. Called as print is, so each line
    keeps its own flush; core code gets it as a callable, or its `enabled` as a flag."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, *args, **kwargs) -> None:
        if self.enabled:
            print(*args, **kwargs)

    def line(self, text: str) -> None:
        """One line, flushed at once, written whole: the checkpoint thread's lines (a save's, a checkpoint's
        evals) never split the loop's."""
        self(text + "\n", end="", flush=True)


def metrics_lines(text: str) -> list[dict]:
    """The records of a metrics.jsonl's text: its complete lines. A process killed while appending may
    leave a last line without its newline; it is skipped, as any reader of the file should skip it."""
    records = []
    for line in text.split("\n")[:-1]:  # after the last newline: "", or a partial line
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("iter"), int):
            records.append(record)
    return records


def as_json_line(record: dict) -> str:
    """One line of JSON that any reader parses: a non-finite number (a diverged loss) is written as null."""
    finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(finite) + "\n"


VALIDATION_KEY = "validation_seconds"  # how long a checkpoint's evals took (worker/validation.py): the mark of
# their records in metrics.jsonl


def before_start(record: dict, start_iter: int) -> bool:
    """Whether a metrics.jsonl record came before a run's start at `start_iter`: a step before it, or an
    eval up to it (the eval at a checkpoint's iteration is written before the checkpoint), or the evals of
    a checkpoint up to it."""
    at_start = "val_loss" in record or VALIDATION_KEY in record
    return record["iter"] < start_iter or (0 < record["iter"] == start_iter and at_start)


class MetricsLog:
    """out_dir/metrics.jsonl, rank 0's: the loss history without WandB, one JSON line per logged step
    (iter, loss, lr, time_ms, tokens_per_sec, mfu, grad_norm), per eval (iter, train_loss, val_loss) and
    per checkpoint's evals (iter, their metrics, validation_seconds), each appended whole in one write and
    flushed. A run that starts at iteration N (a rerun, a restart) first keeps only what its checkpoint had
    seen: the steps before N, the evals up to N (a resumed run does not repeat the eval at N; a new run,
    N = 0, starts the file anew) and the checkpoints' evals shown so far, so no iteration appears twice."""

    def __init__(self, path: Path, start_iter: int):
        self.path = path
        self.eval_at_start = None  # the kept record of the eval at N, which the resumed run does not repeat
        self.validation_at_start = None  # and of the evals of the checkpoint at N
        self.validated: set[int] = set()  # the iterations of the checkpoints whose evals are kept
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return
        kept = [r for r in metrics_lines(text) if before_start(r, start_iter)]
        self.eval_at_start = next((r for r in kept if r["iter"] == start_iter and "val_loss" in r), None)
        self.validation_at_start = next((r for r in kept if r["iter"] == start_iter and VALIDATION_KEY in r), None)
        self.validated = {r["iter"] for r in kept if VALIDATION_KEY in r}
        kept_text = "".join(as_json_line(r) for r in kept)
        if kept_text != text:
            write_text_atomic(path, kept_text)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(as_json_line(record))


def format_eta(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def start_wandb(cfg, out_dir, run_id: str | None):
    """A WandB run that a restart or rerun continues (same id); returns (run, id)."""
    import wandb

    run_id = run_id or secrets.token_hex(4)
    run = wandb.init(
        project=cfg.wandb_project,
        name=cfg.wandb_run_name,
        id=run_id,
        resume="allow",
        config=cfg.to_dict(),
        dir=str(out_dir),
    )
    return run, run_id


class Reporter:
    """Console lines, WandB, metrics.jsonl and TensorBoard on rank 0; ray.train.report on every rank at evals."""

    def __init__(
        self,
        cfg,
        say: Say,
        tokens_per_iter: int,
        estimate_mfu: Callable[[float], float | None],
        device: torch.device,
        wandb_run=None,
        report_to_ray: Callable | None = None,
        results_at: str | None = None,
        start_iter: int | None = None,
    ):
        self.cfg, self.say, self.tokens_per_iter, self.device = cfg, say.line, tokens_per_iter, device
        self.is_rank_zero = say.enabled
        self.estimate_mfu, self.wandb_run, self.report_to_ray = estimate_mfu, wandb_run, report_to_ray
        self.results_at = results_at  # the run's folder in Ray storage (a path or a URI)
        # The iteration the run starts at, for metrics.jsonl (None: none written); an eval_only run has eval.json.
        keep_history = self.is_rank_zero and start_iter is not None and not cfg.eval_only
        self.history = MetricsLog(Path(cfg.out_dir) / METRICS_NAME, start_iter) if keep_history else None
        self.board = None
        self.eval_metrics = eval_metrics(eval_tasks(cfg.evals))  # what a checkpoint's evals report
        self.wandb_defined: set[str] = set()  # metrics WandB plots against checkpoint_iter
        if keep_history and cfg.tensorboard:
            from raygpt.worker.tensorboard import TENSORBOARD_DIR, TensorBoard  # tensorboardX: rank 0 only

            self.board = TensorBoard(Path(cfg.out_dir) / TENSORBOARD_DIR, start_iter)
            if self.history.eval_at_start is not None:  # hidden by the restart marker at start_iter: again
                self._board(self.history.eval_at_start, BOARD_EVAL_KEYS)
            if self.history.validation_at_start is not None:
                at_start = self.history.validation_at_start
                self._board(at_start, tuple(k for k in self.eval_metrics if at_start.get(k) is not None))
        self.running_mfu = -1.0
        self.step_times: list[float] = []
        self.eval_seconds = 0.0
        self.steps_seen = 0

    def _history(self, record: dict) -> None:
        if self.history is not None:
            self.history.write(record)

    def _board(self, metrics: dict, keys: tuple[str, ...], flush: bool = False) -> None:
        if self.board is not None:
            tags = {k: WANDB_KEYS.get(k, k) for k in keys}  # a checkpoint's evals keep their own names
            self.board.scalars(metrics["iter"], {tags[k]: metrics[k] for k in keys if metrics.get(k) is not None})
            if flush:
                self.board.flush()

    def _wandb(self, metrics: dict) -> None:
        if self.wandb_run is not None:
            values = {WANDB_KEYS[k]: v for k, v in metrics.items() if k in WANDB_KEYS and v is not None}
            self.wandb_run.log(values, step=metrics["iter"])

    def eta(self, iter_num: int, dt: float) -> str:
        """Steps and evals still to come from iter_num, at the typical step time and the last eval's time."""
        cfg = self.cfg
        typical_dt = statistics.median(self.step_times) if self.step_times else dt
        evals_left = cfg.max_iters // cfg.eval_interval - iter_num // cfg.eval_interval
        return format_eta((cfg.max_iters - iter_num) * typical_dt + max(0, evals_left) * self.eval_seconds)

    def step(self, iter_num: int, loss: float, grad_norm: float, lr: float, dt: float, last_val_loss: float,
             nonfinite_skips: int) -> None:  # fmt: skip
        """A finished step (iter_num), every log_interval: its loss and gradient norm (before clipping),
        already on the host, and the non-finite steps skipped so far."""
        self.steps_seen += 1
        if self.steps_seen >= WARMUP_STEPS:
            self.step_times.append(dt)
            mfu = self.estimate_mfu(dt)
            if mfu is not None:
                self.running_mfu = mfu if self.running_mfu < 0 else 0.9 * self.running_mfu + 0.1 * mfu
        tokens_per_sec = self.tokens_per_iter / dt
        # A non-finite norm is not clipped: its step is skipped (NonFiniteGuard).
        clipped = math.isfinite(grad_norm) and 0 < self.cfg.grad_clip < grad_norm
        mfu_text = f"{self.running_mfu * 100:.2f}%" if self.running_mfu >= 0 else "n/a"
        norm_text = f"{grad_norm:.4f}{' (clipped)' if clipped else ''}"
        self.say(
            f"iter {iter_num}: loss {loss:.4f}, time {dt * 1000:.2f}ms, mfu {mfu_text}, {tokens_per_sec:,.0f} tok/s, "
            f"lr {lr:.2e}, grad norm {norm_text}, eta {self.eta(iter_num + 1, dt)}"
        )
        metrics = {
            "iter": iter_num,
            "loss": loss,
            "lr": lr,
            "time_ms": dt * 1000,
            "tokens_per_sec": tokens_per_sec,
            "mfu": self.running_mfu if self.running_mfu >= 0 else None,
            "grad_norm": grad_norm,
            "clipped": float(clipped),
            "nonfinite_skips": nonfinite_skips,
        }
        self._history({key: metrics[key] for key in HISTORY_STEP_KEYS})
        self._board(metrics, BOARD_STEP_KEYS)
        self._wandb({**metrics, "val_loss": last_val_loss, "tokens_seen": (iter_num + 1) * self.tokens_per_iter})

    def eval(self, state, lr: float, seconds: float, weights_in_sync: bool) -> dict:
        """An eval's losses (in `state`): console, WandB, TensorBoard (flushed), and for eval_only
        out_dir/eval.json (Ray's Result carries only checkpointed metrics). Returns the metrics for to_ray,
        which the checkpointer calls once the eval's checkpoint (if any) is written."""
        metrics = {
            "iter": state.iter_num,
            "train_loss": state.last_eval["train"],
            "val_loss": state.last_eval["val"],
            "best_val_loss": state.best_val_loss,
            "lr": lr,
            "tokens_seen": state.iter_num * self.tokens_per_iter,
            # The allocator's high-water mark so far: what decides whether a micro-batch fits.
            "peak_memory_gib": torch.cuda.max_memory_allocated(self.device) / 2**30
            if self.device.type == "cuda"
            else None,
            "weights_in_sync": weights_in_sync,
        }
        self.eval_seconds = seconds
        memory = metrics["peak_memory_gib"]
        memory_text = f", peak memory {memory:.2f} GiB" if memory is not None else ""
        self.say(
            f"step {metrics['iter']}: train loss {metrics['train_loss']:.4f}, val loss {metrics['val_loss']:.4f} "
            f"(eval {seconds:.2f}s{memory_text})"
        )
        if self.cfg.eval_only and self.is_rank_zero:
            evaluated = json.dumps({**metrics, "eval_iters": self.cfg.eval_iters})
            write_text_atomic(Path(self.cfg.out_dir) / EVAL_NAME, evaluated)
            if self.results_at:  # where the driver reads it, on whichever machine it runs
                write_small_file(join_uri(self.results_at, EVAL_NAME), evaluated)
        self._history({key: metrics[key] for key in ("iter", "train_loss", "val_loss")})
        self._board(metrics, BOARD_EVAL_KEYS, flush=True)
        self._wandb(metrics)
        return metrics

    def validation(self, metrics: dict) -> None:
        """A checkpoint's evals (worker/validation.py), whenever they arrive: the console line, TensorBoard
        at the checkpoint's iteration, metrics.jsonl and WandB. WandB's steps never go back, so there the
        points are plotted against checkpoint_iter instead."""
        iter_num = metrics["iter"]
        scored = {k: metrics[k] for k in self.eval_metrics if isinstance(metrics.get(k), (int, float))}
        shown = [f"{k.split('/')[0]} acc_norm {v:.4f}" if k.endswith("/acc_norm") else f"{k} {v:.4f}"
                 for k, v in scored.items() if not k.endswith("/acc")]  # fmt: skip
        seconds = metrics.get(VALIDATION_KEY, 0.0)
        self.say(f"validation of iter {iter_num}: {', '.join(shown)} (took {seconds:.1f}s)")
        self._history({"iter": iter_num, **scored, VALIDATION_KEY: seconds})
        self._board({"iter": iter_num, **scored}, tuple(scored), flush=True)
        if self.wandb_run is not None:
            for name in set(scored) - self.wandb_defined:
                self.wandb_run.define_metric(name, step_metric="checkpoint_iter")
                self.wandb_defined.add(name)
            self.wandb_run.log({**scored, "checkpoint_iter": iter_num})

    def validated_iters(self) -> set[int]:
        """The iterations whose checkpoint's evals an earlier process of this run has shown."""
        return set(self.history.validated) if self.history is not None else set()

    def to_ray(self, metrics: dict, checkpoint=None) -> None:
        if self.report_to_ray is not None:
            self.report_to_ray(metrics, checkpoint=checkpoint)

    def finish(self) -> None:
        if self.board is not None:
            self.board.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
