"""What the training loop asks of Ray, wherever it runs: its rank, the checkpoint to resume, where reports go;
the torch backend Ray Train sets the workers' process group up with (NoTeardownTorchConfig); the one
thread that keeps the worker's Ray Train calls in order (OrderedRayCalls); and the exit of a Tune trial's
process, which waits for the loop (exit_waits_for_block).

A Ray Train worker (`train_worker()`) is the usual place. A one-worker Tune trial can run the loop in the
trial's own process (`tune_trial()`): Tune then restarts, checkpoints and ranks it, and each trial after
the first finds torch imported, the GPU initialized and its graphs compiled in that process (Tune reuses
the trial actor), instead of starting a Train controller and a worker process of its own.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from ray.train.torch import TorchConfig

from raygpt import ray_compat


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
    # Ray Train's controller runs the trainer's validation tasks on reported checkpoints (worker/validation.py);
    # a Tune trial's own process has no controller.
    validation_tasks: bool = True


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
        validation_tasks=False,
    )


def tune_stop_requested() -> Callable[[], bool]:
    """Whether Tune has stopped this trial (a scheduler such as ASHA, or the end of the sweep).

    Tune ends a function trial at its next tune.report, an eval interval away, and in the thread that
    reports (raygpt's checkpoint thread), not the loop's; meanwhile Tune gives the trial's process 2 s to
    finish before it starts the next trial there. Its session's stop event says so at once (a private
    attribute: where it is missing, trials end at their next report as Tune means them to)."""
    return ray_compat.tune_stop_event()


class NoTeardownTorchConfig(TorchConfig):
    """Ray's TorchConfig, whose backend leaves the process group to die with the killed worker.

    Ray Train ends a worker group (after a failure, for an elastic resize, at the end of the run) by asking
    each worker to destroy its process group and then killing every worker process anyway. After a worker
    died, a survivor's destroy waits on collectives the dead rank never joins (NCCL), and the worker cannot
    answer Ray's shutdown call until it returns: Ray waits out its patience (5 s) before it kills the worker
    and starts the new group. The process is killed either way, so raygpt's backend leaves the group to die
    with it; set-up is Ray's own."""

    @property
    def backend_cls(self):
        return ray_compat.torch_backend_without_teardown() or super().backend_cls


class OrderedRayCalls:
    """The one background thread that makes this worker's Ray Train calls, in the order they are submitted.

    Invariant: ray.train.report and ray.train.get_preemption_info are collectives, numbered per process,
    so every rank must make them in the same order. Every call the loop makes to them goes through here:
    the Checkpointer's writes and their reports, the reports of evals without a checkpoint, and
    PreemptionWatch's polls. Rank 0's questions about its checkpoints' validations (no collective) come
    here too: each waits for the reports before it, and the loop waits for none. Synchronous
    (background=False): each job runs at once, in the caller's thread. A job's error is raised in the
    loop's thread at the next raise_error(), wait() or close()."""

    def __init__(self, background: bool):
        self.background = ThreadPoolExecutor(1, thread_name_prefix="raygpt-checkpoint") if background else None
        self.pending: list[Future] = []

    def submit(self, job: Callable) -> None:
        """Run `job` after every job submitted so far; its error is the loop's (raise_error, wait)."""
        if self.background is None:
            job()
        else:
            self.pending = [f for f in self.pending if not f.done() or f.exception() is not None]
            self.pending.append(self.background.submit(job))

    def report(self, report: Callable) -> None:
        """An eval without a checkpoint: report(None), after any save still in flight."""
        self.raise_error()
        self.submit(lambda: report(None))

    def in_order(self, job: Callable) -> Future:
        """Run `job` after every job submitted so far (now, if synchronous); its result and error are the
        Future's, for the caller to read."""
        if self.background is not None:
            return self.background.submit(job)
        future = Future()
        future.set_result(job())
        return future

    def raise_error(self) -> None:
        """A failed background job (a full disk) stops training at the next eval, not at the run's end."""
        for future in self.pending:
            if future.done() and future.exception() is not None:
                self.wait()

    def wait(self) -> None:
        """Block until every submitted job has finished; raise the first one's error."""
        for future in self.pending:
            future.result()
        self.pending.clear()

    def close(self) -> None:
        self.wait()
        if self.background is not None:
            self.background.shutdown()


_block_ended = threading.Event()
_block_ended.set()
_exit_waits_for_blocks = False


@contextmanager
def exit_waits_for_block(timeout_s: float):
    """While the block runs (in any thread), this process's exit waits for it to end, for at most
    timeout_s (the first block's), before Python stops daemon threads: one stopped inside a torch call
    that released the GIL aborts the process ("Fatal Python error: Aborted"). atexit handlers run
    before that; one handler serves every block of the process."""
    global _exit_waits_for_blocks
    if not _exit_waits_for_blocks:
        atexit.register(_block_ended.wait, timeout_s)
        _exit_waits_for_blocks = True
    _block_ended.clear()
    try:
        yield
    finally:
        _block_ended.set()
