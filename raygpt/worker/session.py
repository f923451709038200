"""What the training loop asks of Ray, wherever it runs: its rank, the checkpoint to resume, where reports go.

A Ray Train worker (`train_worker()`) is the usual place. A one-worker Tune trial can run the loop in the
trial's own process (`tune_trial()`): Tune then restarts, checkpoints and ranks it, and each trial after
the first finds torch imported, the GPU initialized and its graphs compiled in that process (Tune reuses
the trial actor), instead of starting a Train controller and a worker process of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RaySession:
    world_rank: int
    world_size: int
    local_rank: int
    checkpoint: object | None  # the checkpoint Ray hands a restarted run, or None
    report: Callable  # report(metrics, checkpoint=None)
    checkpoint_type: type  # what report() takes: ray.train.Checkpoint or ray.tune.Checkpoint
    preemption_info: Callable | None  # ray.train.get_preemption_info; None where Ray gives no notice
    gpu: Callable[[], torch.device]  # this worker's GPU
    stop_requested: Callable[[], bool] = lambda: False  # Tune stopped the trial (ASHA): end the loop now


def train_worker() -> RaySession:
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    return RaySession(
        world_rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        local_rank=context.get_local_rank(),
        checkpoint=ray.train.get_checkpoint(),
        report=ray.train.report,
        checkpoint_type=ray.train.Checkpoint,
        preemption_info=ray.train.get_preemption_info,
        gpu=ray.train.torch.get_device,
    )


def tune_trial() -> RaySession:
    """The one worker of a Tune trial run in the trial's process; Ray gave it one GPU (CUDA_VISIBLE_DEVICES)
    where the trial asked for one."""
    from ray import tune

    return RaySession(
        world_rank=0,
        world_size=1,
        local_rank=0,
        checkpoint=tune.get_checkpoint(),
        report=tune.report,
        checkpoint_type=tune.Checkpoint,
        preemption_info=None,
        gpu=lambda: torch.device("cuda", 0),
        stop_requested=tune_stop_requested(),
    )


def tune_stop_requested() -> Callable[[], bool]:
    """Whether Tune has stopped this trial (a scheduler such as ASHA, or the end of the sweep).

    Tune ends a function trial at its next tune.report, an eval interval away, and in the thread that
    reports (raygpt's checkpoint thread), not the loop's; meanwhile Tune gives the trial's process 2 s to
    finish before it starts the next trial there. Its session's stop event says so at once (a private
    attribute: where it is missing, trials end at their next report as Tune means them to)."""
    from ray.train._internal.session import get_session

    stop_event = getattr(get_session(), "stop_event", None)
    return stop_event.is_set if stop_event is not None else (lambda: False)
