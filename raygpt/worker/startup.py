"""The start-up line: where a worker's time to its first step went, printed once by rank 0.

`Startup` is the worker's clock: the loop's set-up marks its parts (`lap(name)`) and its end (`ready()`),
and `after_step(n, now, last)` prints the line after step 2 (whose backward ran beside the optimizer
state the first allocated: its memory peak is the training step's), or after step 1 if it is the last.
`startup_line` is the pure wording. A worker group Ray restarted after a failure counts from the failure:
`FailureClock` (in Ray Train's controller) notes when it was seen, and `first_worker_group` tells a
restart from a first start, both through Ray's key-value store (raygpt.ray_compat).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
from ray.train import UserCallback

from raygpt import ray_compat
from raygpt.driver.plan import RunPlan

RESTART_AFTER_S = 600  # a worker group starting this long after the launcher was restarted by Ray


def first_worker_group(launch_id: str) -> bool | None:
    """Whether no worker group of this launch started before this one (Ray restarts the group after a
    failure): the first to mark the launch in Ray's key-value store. None where that cannot be asked
    (local mode; a private Ray API, which may move)."""
    if not launch_id:
        return None
    return ray_compat.kv_put_once(ray_compat.started_key(launch_id))


def failure_seen_at(launch_id: str) -> float | None:
    """When Ray Train saw this launch's last worker group fail (FailureClock), taken once: a group
    restarted for another reason (an elastic resize) finds none. None where unknown."""
    if not launch_id:
        return None
    seen = ray_compat.kv_take(ray_compat.failure_key(launch_id))
    try:
        return None if seen is None else float(seen)
    except ValueError:  # only the start-up line depends on it
        return None


class FailureClock(UserCallback):
    """In Ray Train's controller: when it saw a worker fail, kept in Ray's key-value store under the
    launch, so the restarted group's start-up line can count from the failure."""

    def __init__(self, launch_id: str):
        self.launch_id = launch_id

    def after_exception(self, run_context, worker_exceptions) -> None:
        # Where the store cannot be written, the restarted group's line counts from its own process.
        ray_compat.kv_put(ray_compat.failure_key(self.launch_id), str(time.time()).encode())


def process_started_at() -> float | None:
    """When this process started, in time.time() seconds (to 0.01 s); None where /proc cannot say."""
    try:
        with open("/proc/self/stat") as stat:
            # Field 22 is the start time in clock ticks since boot; the name (field 2) may hold spaces.
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as uptime:
            since_boot = float(uptime.read().split()[0])
        return time.time() - (since_boot - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class Laps:
    """The seconds each named part of the worker's set-up took, for the start-up line."""

    def __init__(self, start: float):
        self.last, self.parts = start, []

    def __call__(self, name: str) -> None:
        now = time.time()
        self.parts.append((name, now - self.last))
        self.last = now

    def summary(self, shortest_s: float = 0.05) -> str:
        return ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.parts if seconds >= shortest_s)


def startup_line(plan: RunPlan, worker_started: float, ready: float, first_step_done: float,
                 peak_gib: float | None = None, first_group: bool | None = None, parts: str = "",
                 process_started: float | None = None, failed_at: float | None = None) -> str:  # fmt: skip
    """Where the time to the first step went, and on a GPU the training step's memory peak, known before
    a long run goes on; `parts` breaks "model and data" down (Laps.summary).
    A worker group restarted after a failure (first_group False) counts from the failure Ray Train saw
    (failed_at) and from its worker process's start, where known; when first_group is unknown (None), a
    group starting long after the launcher was ready is taken for a restart."""
    model = (
        f"model and data {ready - worker_started:.1f}s, first eval and step (compile) {first_step_done - ready:.1f}s"
    )
    if peak_gib is not None:
        model += f"; peak memory {peak_gib:.2f} GiB"
    if parts:
        model += f"; model and data: {parts}"
    since_ray = worker_started - plan.ray_ready_at
    if first_group is None:
        first_group = 0 <= since_ray < RESTART_AFTER_S
    if not plan.launched_at or not first_group:
        if process_started is not None and process_started <= worker_started:
            model = f"worker process to the loop {worker_started - process_started:.1f}s, {model}"
            if failed_at is not None and failed_at <= process_started:
                model = f"failure seen to the new worker process {process_started - failed_at:.1f}s, {model}"
                return f"start-up after a restart {first_step_done - failed_at:.1f}s: {model}"
        return f"start-up after a restart: {model}"
    ray_parts = {"launcher checks and Ray": plan.ray_ready_at - plan.launched_at, "worker group": since_ray}
    # A Tune trial training in its own process has neither a launcher nor a worker group of its own.
    shown = [f"{name} {seconds:.1f}s" for name, seconds in ray_parts.items() if seconds >= 0.05]
    return f"start-up {first_step_done - plan.launched_at:.1f}s: {', '.join([*shown, model])}"


class Startup:
    """One worker's start-up clock, from `started` (the worker function's start) to its first steps."""

    def __init__(self, plan: RunPlan, rank: int, say: Callable, started: float):
        self.plan, self.say, self.started = plan, say, started
        self.lap = Laps(started)  # lap(name): a part of the set-up has ended
        self.first_group = first_worker_group(plan.launch_id) if rank == 0 else None
        self.device = torch.device("cpu")
        self.ready_at = self.first_step_done = 0.0

    def ready(self, device: torch.device) -> None:
        """The model, optimizer and data are set up; the first eval and step come next."""
        self.lap("the rest")
        self.device, self.ready_at = device, self.lap.last

    def after_step(self, local_iter_num: int, now: float, last: bool) -> None:
        """After this process's steps 1 and 2 (the loop's hook point)."""
        if local_iter_num == 1:
            self.first_step_done = now
        if local_iter_num == 2 or (local_iter_num == 1 and last):
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
            failed_at = failure_seen_at(self.plan.launch_id) if self.first_group is False else None
            line = startup_line(self.plan, self.started, self.ready_at, self.first_step_done, peak,
                                self.first_group, self.lap.summary(), process_started_at(), failed_at)  # fmt: skip
            self.say(line, flush=True)
