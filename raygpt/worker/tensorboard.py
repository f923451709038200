"""Rank 0's TensorBoard event files, in out_dir/tensorboard (`tensorboard --logdir OUT_DIR/tensorboard`).

Written with tensorboardX, which ray[train] installs, through its plain event-file writer: SummaryWriter
hands each point to a multiprocessing queue drained by a thread, a cost per point that a small model's
step would notice. Here the scalars of one step are one event, appended by the caller's thread to a
buffered file that is flushed at evals and at the end.

A run that starts at iteration N (a rerun, a restart) begins its file with TensorBoard's restart marker
at step N (what SummaryWriter's `purge_step` writes): TensorBoard then hides the points of earlier files at
step N or later, such as those a killed process wrote past its checkpoint, so no step appears twice. A
new run, N = 0, hides every earlier point.
"""

from __future__ import annotations

import time
from pathlib import Path

from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary

TENSORBOARD_DIR = "tensorboard"  # in out_dir


class TensorBoard:
    """One event file of a run's TensorBoard folder, for one process: scalars by step."""

    def __init__(self, logdir: Path, start_iter: int):
        logdir.mkdir(parents=True, exist_ok=True)
        # TensorBoard reads a folder's files in name order, and tensorboardX names a file by the second it
        # was opened: the suffix orders (and keeps apart) the files of processes that start within one second.
        self.writer = EventsWriter(str(logdir / "events"), filename_suffix=f".{time.time_ns()}")
        restart = SessionLog(status=SessionLog.START)
        self.writer.write_event(Event(wall_time=time.time(), step=start_iter, session_log=restart))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Points at `step`, tag -> value (e.g. {"val/loss": 1.47}), written as one event."""
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
        self.writer.write_event(Event(wall_time=time.time(), step=step, summary=summary))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
