"""Stopping on notice: a node of the run about to be reclaimed, or SIGTERM, becomes one checkpoint at the
next iteration boundary.

Ray's notice: Train V2's controller watches for drained nodes (a spot reclaim, `ray drain-node --reason
DRAIN_NODE_REASON_PREEMPTION`) and hands the workers a PreemptionInfo with the reclaim deadline.
`ray.train.get_preemption_info()` is a barrier that answers every rank with rank 0's view, so
PreemptionWatch polls it only every `every` iterations: all ranks poll on the same iterations and stop on
the same one. It is one of Ray's collectives, numbered per process as ray.train.report's are, so it must
come in the same order as the reports on every rank: with asynchronous checkpoints the reports are made
by the worker's one thread of Ray calls (session.OrderedRayCalls), and so is the poll (`run_in_order`).
Each answer is read at the first poll iteration after it has come, so the loop never waits on Ray (~10 ms
a poll, CPU) nor on a checkpoint write queued before the poll; the ranks then agree (one all-reduce) on whether to stop.
After the checkpoint the loop trains no further (any step taken then would be lost) and waits
for Ray to restart the run from it, which Ray does at the deadline (FailureConfig.max_preemption_failures).

SIGTERM (what spot instances, Kubernetes and schedulers send) to a process that trains itself (local mode):
the handler only sets `stop_requested`, which the loop reads at the next iteration boundary, checkpoints,
and raises Terminated; the launcher then says where to continue and exits with EXIT_TERMINATED.
SIGTERM to the launcher of a run on Ray: the launcher marks the launch in Ray's key-value store
(`ask_workers_to_stop`); the workers read the mark with their next poll, agree as for a preemption,
checkpoint, and end the run; the launcher then exits as above. A second SIGTERM stops them at once.
No Ray import at module level: the loop hands in the poll.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from raygpt import ray_compat

EXIT_TERMINATED = 128 + signal.SIGTERM  # as a shell reports a process stopped by SIGTERM
# Ray restarts the run at the deadline (or 120 s after a notice without one); a loop still waiting this long
# after that has been forgotten, and fails rather than hang.
RESTART_MARGIN_S = 60.0
NO_DEADLINE_S = 120.0  # Ray's own wait when the notice carries no deadline

# Set by the SIGTERM handler, read by the loop at every iteration boundary (Event.is_set costs ~50 ns).
stop_requested = threading.Event()
# What the ranks agree on (the largest wins): nothing, a preemption notice, the launcher's SIGTERM.
NOTHING, PREEMPTED, LAUNCHER_STOPPED = 0, 1, 2
LAUNCHER_SIGTERM = "SIGTERM to the launcher"  # a Notice's reason


class Terminated(KeyboardInterrupt):
    """SIGTERM stopped the run; a KeyboardInterrupt, so whatever handles Ctrl-C handles it too. `not_saved`:
    why the stop saved no checkpoint (not_saved()), or empty."""

    def __init__(self, message: str = "", not_saved: str = ""):
        super().__init__(message)
        self.not_saved = not_saved


@dataclass(frozen=True)
class Notice:
    """Why the loop stops: Ray's preemption notice (`ranks` on the reclaimed nodes) or SIGTERM."""

    reason: str  # "preemption", "SIGTERM" (to this process) or LAUNCHER_SIGTERM
    noticed_at: float  # time.time() when the loop saw it
    deadline: float | None = None  # UNIX seconds when the node goes; None: unknown
    ranks: tuple[int, ...] = ()

    def seconds_left(self, now: float | None = None) -> float | None:
        return None if self.deadline is None else self.deadline - (time.time() if now is None else now)


class PreemptionWatch:
    """notice(iter_num) every iteration: a Notice once per preemption (or SIGTERM), else None.

    `poll` is ray.train.get_preemption_info and `stop_asked` whether the launcher got SIGTERM (either None:
    not watched; both None in local mode, where only this process's SIGTERM is; `tell_launcher`, rank 0's,
    hands the launcher why its SIGTERM saved nothing). Both are asked in one job
    submitted through `run_in_order` (OrderedRayCalls.in_order; default: called at once) when
    iter_num % every == 0, the same iterations on every rank. Answers are read when they have come, never
    waited for: a poll queued behind a background checkpoint write must not make the loop wait for the
    write. Since ranks may read an answer at different iterations, `agree` (a MAX all-reduce across ranks
    of NOTHING, PREEMPTED or LAUNCHER_STOPPED) makes the decision the same on every rank, at the same
    iteration."""

    def __init__(self, poll: Callable | None, every: int, run_in_order: Callable[[Callable], Future] | None = None,
                 say: Callable[[str], None] = print, agree: Callable[[int], int] = int,
                 stop_asked: Callable[[], bool] | None = None,
                 tell_launcher: Callable[[str], None] | None = None):  # fmt: skip
        self.poll, self.every, self.say, self.agree = poll, max(1, every), say, agree
        self.stop_asked, self.tell_launcher = stop_asked, tell_launcher
        self.run_in_order = run_in_order or called_now
        self.answers: list[Future] = []  # polls submitted, oldest first
        self.noticed_nodes: set[str] = set()
        self.stopping: Notice | None = None
        self.notice_iter = 0  # the iteration of the latest notice

    def notice(self, iter_num: int) -> Notice | None:
        if stop_requested.is_set():  # set only in a process that trains itself: one rank
            self.stopping = Notice("SIGTERM", time.time())
            self.say(f"SIGTERM at iter {iter_num}: saving a checkpoint, then stopping")
            return self.stopping
        if (self.poll is None and self.stop_asked is None) or iter_num % self.every:
            return None
        self.answers.append(self.run_in_order(self.ask))
        info, asked = self.arrived_answers()
        decision = self.agree(LAUNCHER_STOPPED if asked else PREEMPTED if info is not None else NOTHING)
        if decision == NOTHING:
            return None
        if decision == LAUNCHER_STOPPED:
            self.stopping = Notice(LAUNCHER_SIGTERM, time.time())
            self.say(f"{LAUNCHER_SIGTERM} at iter {iter_num}: saving a checkpoint, then ending the run")
            return self.stopping
        self.notice_iter = iter_num
        if info is None:  # another rank has read the notice already; this one's answer is still queued
            self.stopping = Notice("preemption", time.time())
            self.say(f"preemption notice at iter {iter_num} (read by another rank first): saving a checkpoint")
        else:
            self.stopping = self.preemption(info, time.time())
        return self.stopping

    def arrived_answers(self) -> tuple:
        """The polls' answers that have come, never waited for: Ray's preemption info of nodes not noticed
        yet (None: none), and whether the launcher asked to stop."""
        info, asked = None, False
        while self.answers and self.answers[0].done():
            answer, stop = self.answers.pop(0).result()
            asked = asked or stop
            if answer is not None and not set(answer.preempted_node_ids) <= self.noticed_nodes:
                info = answer
        return info, asked

    def preemption(self, info, noticed_at: float) -> Notice:
        """The Notice of Ray's preemption info, said in one line."""
        self.noticed_nodes |= set(info.preempted_node_ids)
        deadline = None if info.deadline_ms is None else info.deadline_ms / 1000
        notice = Notice("preemption", noticed_at, deadline, tuple(info.preempted_ranks))
        left = notice.seconds_left()
        self.say(
            f"preemption notice at iter {self.notice_iter}: ranks {list(notice.ranks)} lose their node "
            + (f"in {left:.1f}s" if left is not None else "(no deadline given)")
            + ": saving a checkpoint"
        )
        return notice

    def ask(self) -> tuple:
        """One poll: Ray's preemption info (None: none), and whether the launcher asked to stop."""
        info = self.poll() if self.poll is not None else None
        return info, bool(self.stop_asked()) if self.stop_asked is not None else False

    def stop(self, iter_num: int, saved_at: float | None = None, nonfinite_steps: int = 0) -> None:
        """After the notice's checkpoint is written and reported (or, after `nonfinite_steps` non-finite
        steps in a row, not written): say how long it took (or why not), then raise Terminated (SIGTERM),
        wait for Ray's restart (a preemption; never returns), or return (the launcher's SIGTERM: the loop
        ends the run)."""
        if self.stopping.reason == "preemption" and self.stopping.deadline is None:
            # This rank's answer was still queued at the notice: it has likely come during the save, with
            # the deadline the wait for Ray's restart needs and the line states.
            info, _ = self.arrived_answers()
            if info is not None:
                self.stopping = self.preemption(info, self.stopping.noticed_at)
        notice, saved_at = self.stopping, time.time() if saved_at is None else saved_at
        left = notice.seconds_left(saved_at)
        unsaved = not_saved(iter_num, nonfinite_steps) if nonfinite_steps else ""
        if unsaved:
            self.say(f"{notice.reason}: {unsaved}; the last good checkpoint stays")
            if notice.reason == LAUNCHER_SIGTERM and self.tell_launcher is not None:
                self.tell_launcher(unsaved)
        else:
            self.say(
                f"{notice.reason}: checkpoint at iter {iter_num} saved {saved_at - notice.noticed_at:.2f}s after "
                "the notice" + (f", {left:.1f}s before the deadline" if left is not None else "")
            )
        if notice.reason == "SIGTERM":
            raise Terminated(f"SIGTERM: stopped at iter {iter_num}", unsaved)
        if notice.reason == LAUNCHER_SIGTERM:
            return
        self.wait_for_restart(notice)

    def wait_for_restart(self, notice: Notice, sleep: Callable[[float], None] = time.sleep) -> None:
        """Train no further: Ray stops this worker at the deadline and restarts the run from the checkpoint."""
        until = (notice.deadline or notice.noticed_at + NO_DEADLINE_S) + RESTART_MARGIN_S
        while time.time() < until:
            sleep(min(1.0, max(0.0, until - time.time())))
        raise RuntimeError(f"Ray did not restart the run {RESTART_MARGIN_S:.0f}s after the preemption deadline")


def called_now(job: Callable) -> Future:
    """run_in_order without a background thread: the job runs now."""
    future = Future()
    future.set_result(job())
    return future


def handle_sigterm() -> Callable[[], None]:
    """Install the SIGTERM handler of a process that trains itself: the first SIGTERM sets stop_requested
    (a checkpoint at the next iteration boundary, then Terminated), a second raises Terminated at once.
    Main thread only. Returns a function that puts the previous handler back."""
    stop_requested.clear()

    def on_sigterm(signum, frame) -> None:
        if stop_requested.is_set():
            raise Terminated("SIGTERM twice: stopped without waiting for the checkpoint")
        stop_requested.set()

    previous = signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)
        stop_requested.clear()

    return restore


def ask_workers_to_stop(launch_id: str) -> bool:
    """The launcher's SIGTERM, handed to the run's workers through Ray's key-value store. False where that
    cannot be done (no launch id; a private Ray API, which may move): the launcher then stops the workers
    at once, as on Ctrl-C."""
    if not launch_id:
        return False
    return ray_compat.kv_put(ray_compat.stop_key(launch_id), b"1")


def launcher_asked_to_stop(launch_id: str) -> bool:
    """Whether the launcher of this launch got SIGTERM (a worker asks at its poll cadence, ~1 ms); where the
    mark cannot be read, no: train on."""
    return ray_compat.kv_exists(ray_compat.stop_key(launch_id))


NONFINITE_STEPS = "nonfinite_steps"  # a notice's report: the non-finite steps in a row that kept it from saving


def not_saved(iter_num: int, nonfinite_steps: int) -> str:
    """Why a notice saved no checkpoint, for the worker's line and the launcher's last one."""
    return (f"no checkpoint at iter {iter_num}: its last {nonfinite_steps} step(s) were not finite, and "
            "diverged weights are never saved")  # fmt: skip


def tell_launcher_not_saved(launch_id: str, why: str) -> None:
    """Hand the launcher why its SIGTERM's checkpoint was not saved, for its last line (Ray's result holds
    only reports that carry a checkpoint); where the store cannot be written, that line names the latest
    checkpoint alone."""
    ray_compat.kv_put(ray_compat.not_saved_key(launch_id), why.encode())


def why_not_saved(launch_id: str) -> str:
    """What tell_launcher_not_saved handed the launcher of this launch; empty where the checkpoint was saved."""
    why = ray_compat.kv_take(ray_compat.not_saved_key(launch_id)) if launch_id else None
    return why.decode() if why else ""


def notice_metrics(state, lr: float, tokens_per_iter: int, notice: Notice, nonfinite_steps: int = 0) -> dict:
    """What a notice checkpoint reports to Ray: the last eval's numbers (no eval is run), at this iteration.
    Ray keeps its latest checkpoint whatever the score, so a restart resumes from this one. After
    `nonfinite_steps` non-finite steps in a row nothing is saved, and the report says so."""
    return {
        "iter": state.iter_num,
        "train_loss": state.last_eval["train"],
        "val_loss": state.last_eval["val"],
        "best_val_loss": state.best_val_loss,
        "lr": lr,
        "tokens_seen": state.iter_num * tokens_per_iter,
        "stopped_by": notice.reason,
        NONFINITE_STEPS: nonfinite_steps,
    }
