"""Where a sweep (raygpt.tune) keeps its files, and what a rerun of its command does.

A sweep named NAME (`--name`, default `<run_name>-tune`) has two folders of that name: Tune's experiment
folder in storage_path (each trial's results, Tune's checkpoints, TensorBoard files, in `<trial id>/`), and
beside out_dir the trials' out_dirs (`NAME/<trial id>`: ckpt.pt, wandb files). out_dir itself, the folder a
launch of the same config trains in, is left alone.

Rerunning the command of a sweep that has not finished (interrupted, or with failed trials) resumes it
(Tune's Tuner.restore: unfinished trials continue from their last checkpoints); rerunning a finished one
shows its results; `--fresh` starts a new sweep beside it (NAME-2, ...), and nothing is deleted. Each case
is one line. A command with other settings under a sweep's name is refused: its trials would not be the
sweep's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from raygpt.config.schema import TrainConfig
from raygpt.errors import LaunchError
from raygpt.storage.uri import join_uri, list_folders, read_small_file, storage_root, write_small_file

SETTINGS_NAME = "raygpt-sweep.json"  # in the experiment folder: what the sweep's command asked for


@dataclass(frozen=True)
class Sweep:
    name: str
    path: str  # Tune's experiment folder: a local path or a URI
    trials_dir: str  # where each trial's out_dir is made, `<trials_dir>/<trial id>`
    state: str  # "new", "resume" (Tune's state is there, and a trial or more is unfinished) or "finished"
    line: str  # what the sweep says it does


def sweep_folders(cfg: TrainConfig, name: str) -> tuple[str, str]:
    """(experiment folder, trials folder) of the sweep `name`; cfg's paths absolute."""
    return join_uri(storage_root(cfg.storage_path), name), str(Path(cfg.out_dir).parent / name)


def find_sweep(cfg: TrainConfig, name: str, settings: dict | None, trials: int, fresh: bool = False) -> Sweep:
    """The sweep a command of these `settings` (sweep_settings; None: not compared) runs, of `trials` trials."""
    from ray.tune import Tuner

    path, trials_dir = sweep_folders(cfg, name)
    if fresh and is_taken(cfg, name):
        fresh_name = next(f"{name}-{n}" for n in range(2, 10_000) if not is_taken(cfg, f"{name}-{n}"))
        path, trials_dir = sweep_folders(cfg, fresh_name)
        line = f"--fresh: a new sweep '{fresh_name}' in {path}; '{name}' is kept as it was"
        return Sweep(fresh_name, path, trials_dir, "new", line)
    if not Tuner.can_restore(path):
        return Sweep(name, path, trials_dir, "new", f"a new sweep '{name}' in {path}")
    check_same_settings(name, path, settings)
    unfinished = unfinished_trials(path, trials)
    if unfinished:
        line = f"resuming sweep '{name}' in {path}: {unfinished} of {trials} trials unfinished"
        return Sweep(name, path, trials_dir, "resume", line)
    line = f"sweep '{name}' in {path} has finished; its results follow (--fresh starts a new sweep beside it)"
    return Sweep(name, path, trials_dir, "finished", line)


def is_taken(cfg: TrainConfig, name: str) -> bool:
    path, trials_dir = sweep_folders(cfg, name)
    return Path(trials_dir).exists() or name in list_folders(storage_root(cfg.storage_path), name)


def trial_statuses(path: str) -> list[str]:
    """Tune's status of each trial of the sweep at `path`: TERMINATED (ended), ERROR, or not ended."""
    from ray.tune import ExperimentAnalysis

    return [trial.status for trial in ExperimentAnalysis(path).trials]


def unfinished_trials(path: str, trials: int, failed_too: bool = True) -> int:
    """Trials of the sweep at `path` (of `trials`) that have not ended, those not started included, and
    unless not `failed_too` the failed ones: a rerun resumes them all."""
    statuses = trial_statuses(path)
    ended = statuses.count("TERMINATED") + (0 if failed_too else statuses.count("ERROR"))
    return max(trials - ended, 0)


def finished_results(sweep: Sweep):
    """The results of a finished sweep, read from its experiment folder (no Ray needed)."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    return ResultGrid(ExperimentAnalysis(sweep.path))


def sweep_settings(cfg: TrainConfig, search_space: dict[str, str], sweep_options: dict) -> dict:
    """What a sweep's command asks for, as the flags that ask for it: the sampled keys first, then the
    sweep's options, then the base config (its paths absolute)."""
    settings = {f"--{key}": text for key, text in search_space.items()}
    settings.update({f"--{option}": value for option, value in sweep_options.items()})
    settings.update({f"--{key}": value for key, value in cfg.to_dict().items() if f"--{key}" not in settings})
    return json.loads(json.dumps(settings))  # as read back: tuples as lists


def record_settings(sweep: Sweep, settings: dict | None) -> None:
    if settings is not None:
        write_small_file(join_uri(sweep.path, SETTINGS_NAME), json.dumps(settings, indent=1))


def check_same_settings(name: str, path: str, settings: dict | None) -> None:
    """A rerun continues (or shows) the sweep of the same command; another command is refused, in one line
    naming the first difference."""
    recorded = read_small_file(join_uri(path, SETTINGS_NAME))
    if settings is None or recorded is None:  # a ready param_space, or a sweep of an earlier raygpt
        return
    before = json.loads(recorded)
    for flag, value in settings.items():
        if before.get(flag, value) != value:
            raise LaunchError(
                f"sweep '{name}' in {path} was started with other settings ({flag} {shown_value(before[flag])} then, "
                f"{shown_value(value)} now): rerun it with its own command, or pass --fresh for a new sweep beside it"
            )


def shown_value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)
