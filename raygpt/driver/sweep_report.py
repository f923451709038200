"""What the driver says about a sweep's trials (raygpt.tune): raygpt's line when a trial starts, ends,
fails or is restarted (Tune's own output is off), and the result table."""

from __future__ import annotations

import sys
from pathlib import Path

from ray import tune

from raygpt.driver.sweep_console import trial_tag
from raygpt.driver.trainer import root_cause


def training_iterations(trial) -> str:
    it = (trial.last_result or {}).get("iter")
    return "before its first eval" if it is None else f"after {it} training iterations"


class TrialLines(tune.Callback):
    """raygpt's line when a trial starts, ends, fails or is restarted, in the driver, tagged as the trial's
    own lines are. Tune's own counts reports ("completed after 3 iterations"); these count training
    iterations, the trial's last reported `iter`."""

    def __init__(self, names: list[str], trials_dir: str, max_iters: int):
        self.names, self.trials_dir, self.max_iters = names, trials_dir, max_iters

    def on_trial_start(self, iteration, trials, trial, **info):
        values = ", ".join(f"{name}={fmt(trial.config.get(name))}" for name in self.names)
        print(f"{trial_tag(trial.trial_id)}trial of {values}; out_dir {self.trials_dir}/{trial.trial_id}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        done = result.get("iter") is not None and result["iter"] >= self.max_iters
        best = result.get("best_val_loss")
        print(
            f"{trial_tag(trial.trial_id)}trial {'finished' if done else 'stopped early'} {training_iterations(trial)}"
            + (f", best val loss {best:.4f}" if best is not None else ""),
            flush=True,
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"{trial_tag(trial.trial_id)}trial failed {training_iterations(trial)}", flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        print(
            f"{trial_tag(trial.trial_id)}trial failed {training_iterations(trial)}; Tune restarts it from its last "
            "checkpoint",
            flush=True,
        )


def best_checkpoint(result) -> tuple[str | None, dict | None]:
    """The reported checkpoint with the lowest val_loss (Train or Tune keeps it: both rank by val_loss)."""
    if result.best_checkpoints:  # a trial that trained in its own process reported its checkpoints to Tune
        checkpoint, metrics = min(result.best_checkpoints, key=lambda pair: pair[1]["val_loss"])
        return checkpoint.path, metrics
    df = result.metrics_dataframe
    if df is None or "checkpoint_path" not in df or "val_loss" not in df:
        return result.metrics.get("checkpoint_path") if result.metrics else None, result.metrics
    rows = df[df["checkpoint_path"].notna()]
    if rows.empty:
        return None, None
    row = rows.loc[rows["val_loss"].idxmin()]
    return row["checkpoint_path"], row.to_dict()


def status_of(result, max_iters: int) -> str:
    if result.error is not None:
        return "ERROR"
    it = (result.metrics or {}).get("iter")
    if it is None:
        return "NO RESULT"
    return "DONE" if it >= max_iters else "STOPPED"


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4f}".rstrip("0").rstrip(".")
    return "-" if value is None else str(value)


def trial_id_of(result) -> str:
    return (result.metrics or {}).get("trial_id") or Path(result.path).name


def summarize(grid, names: list[str], max_iters: int) -> int:
    """Print the trial table and the best trial; returns the exit code (1 when no trial produced a result).
    The peak_memory_gib column is the GPU's peak (torch's allocator); on CPU, where nothing measures it,
    the column is left out."""
    results = sorted(grid, key=trial_id_of)  # in trial order, however Tune listed them
    memory = (
        ["peak_memory_gib"] if any(isinstance((r.metrics or {}).get("peak_memory_gib"), float) for r in grid) else []
    )
    header = ["trial", *names, "val_loss", "best_val_loss", "iter", *memory, "status"]
    rows = []
    for result in results:
        metrics = result.metrics or {}
        rows.append(
            [
                trial_id_of(result),
                *(fmt(result.config.get(n)) for n in names),
                *(fmt(metrics.get(key)) for key in ("val_loss", "best_val_loss", "iter", *memory)),
                status_of(result, max_iters),
            ]
        )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
    for result in results:
        if result.error is not None:
            print(f"trial {trial_id_of(result)} failed: {root_cause(result.error)} (the same command resumes it)")
    scored = [r for r in grid if r.metrics and r.metrics.get("best_val_loss") is not None]
    if not scored:
        print("no trial reported a val loss", file=sys.stderr)
        return 1
    best = grid.get_best_result(metric="best_val_loss", mode="min", scope="last")
    values = ", ".join(f"{n}={fmt(best.config.get(n))}" for n in names)
    print(f"best trial {best.metrics.get('trial_id')}: {values}")
    print(f"best val loss {best.metrics['best_val_loss']:.4f}")
    ckpt, _ = best_checkpoint(best)
    print(f"best checkpoint: {ckpt or 'none'}")
    print(f"sweep folder: {grid.experiment_path} (TensorBoard: tensorboard --logdir {grid.experiment_path})")
    return 0
