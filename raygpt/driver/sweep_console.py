"""A sweep's console (raygpt.tune): each trial's lines tagged with its trial id, and the result table last.

Trials print from their own processes, and Ray forwards those lines to the driver. Ray's settings keep them
whole (no folding of look-alike lines across trials, no colour without a terminal); the tag is added where
each line is written (`tagged_output`), in the trial's process or, for a trial that is a Ray Train run, in
its workers (`TaggedLoop`). Forwarded lines arrive a moment after they were printed, so the driver waits
for them to stop (`OutputWatch`) before the table.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time

from raygpt.ray_compat import forward_worker_output


def quiet_sweep_output(verbose: int = 0) -> None:
    """Ray's and Tune's settings for a sweep's console; the driver reads the first when Ray is imported."""
    # Ray folds lines that look alike across processes into one "[repeated Nx across cluster]" (its
    # default), which drops most of each trial's iter lines: each is wanted.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not verbose:
        # Tune's console engine prints its tables even at verbose=0 (the experiment's settings, a TensorBoard
        # path in Ray's temporary session folder); its other engine prints nothing there, and raygpt's lines
        # (driver.sweep_report.TrialLines) say what a trial does.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune snapshots the experiment whenever a trial has kept checkpoints_to_keep new ones, which is what
    # ranks them; its warning about that cadence only says so, seconds apart, in every short sweep.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def trial_tag(trial_id: str) -> str:
    """What starts each of a trial's lines: the trial id, as the result table names it."""
    return f"[{trial_id}] "


LINE_PIECE = re.compile(r"[^\n]*\n|[^\n]+")


class TaggedLines:
    """A text stream that starts every line written to `stream` with `tag`, and notes when it was last
    written to (OutputWatch). Pieces of one line (print's separate writes) get one tag."""

    def __init__(self, stream, tag: str = ""):
        self.stream, self.tag = stream, tag
        self.at_line_start = True
        self.last_write = time.monotonic()
        self.lock = threading.Lock()  # the checkpoint thread prints too

    def write(self, text: str) -> int:
        with self.lock:
            pieces = []
            for piece in LINE_PIECE.findall(text):
                if self.at_line_start and self.tag:
                    pieces.append(self.tag if piece != "\n" else self.tag.rstrip())
                pieces.append(piece)
                self.at_line_start = piece.endswith("\n")
            self.stream.write("".join(pieces))
            self.last_write = time.monotonic()
        return len(text)

    def __getattr__(self, name):  # flush, fileno, isatty, encoding...: the stream's own
        return getattr(self.stream, name)


@contextlib.contextmanager
def tagged_output(tag: str):
    """Within: this process's stdout and stderr lines start with `tag` (a process Tune reuses for the next
    trial gets its streams back, and that trial its own tag)."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = TaggedLines(sys.stdout, tag), TaggedLines(sys.stderr, tag)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = saved


class TaggedLoop:
    """A Ray Train worker's training function whose lines carry the trial's tag: the train loop of a trial
    that is a Ray Train run of its own (raygpt.driver.trainer.build_trainer's train_loop)."""

    def __init__(self, tag: str):
        self.tag = tag

    def __call__(self, loop_config: dict) -> None:
        from raygpt.worker.loop import train_loop_per_worker

        with tagged_output(self.tag):
            train_loop_per_worker(loop_config)


class OutputWatch:
    """The driver's stdout and stderr, watched for Ray's forwarded trial lines: `settle()` waits until none
    has come for QUIET_S (at most SETTLE_LIMIT_S), then stops the forwarding, so that what this process
    prints next (the result table) comes last."""

    QUIET_S = 2.0
    SETTLE_LIMIT_S = 15.0

    def __init__(self):
        self.saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = TaggedLines(sys.stdout), TaggedLines(sys.stderr)
        self.watched = sys.stdout, sys.stderr

    def settle(self) -> None:
        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized():  # no Ray here (a finished sweep's results): nothing forwarded
            return
        deadline = time.monotonic() + self.SETTLE_LIMIT_S
        while time.monotonic() < deadline:
            quiet_for = time.monotonic() - max(stream.last_write for stream in self.watched)
            if quiet_for >= self.QUIET_S:
                break
            time.sleep(self.QUIET_S - quiet_for)
        forward_worker_output(False)

    def close(self) -> None:
        sys.stdout, sys.stderr = self.saved
