"""Writing checkpoints: host staging (copies of the state that a background write reads while training
goes on) and the Checkpointer, which writes and hands each checkpoint to Ray. What a checkpoint holds and
how it is read are raygpt.core.checkpoint's.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from raygpt.core.checkpoint import CKPT_NAME, PROGRESS_NAME, SUMMARY_NAME, UPLOAD_PREFIX, TrainState, save_atomic
from raygpt.storage.files import write_text_atomic
from raygpt.worker.reporting import Say
from raygpt.worker.session import OrderedRayCalls


def copy_to_host(state, buffers: dict, path: tuple = ()):
    """`state` (nested dicts, lists and tuples of tensors and plain values) with every tensor copied into
    host memory, into `buffers` kept from the previous save (pinned for GPU tensors, so the copies run at
    full bus speed). The copy, not the live tensors, is what a background write reads: training goes on
    changing the originals."""
    if isinstance(state, dict):
        return {key: copy_to_host(value, buffers, (*path, key)) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(copy_to_host(value, buffers, (*path, i)) for i, value in enumerate(state))
    if not isinstance(state, torch.Tensor):
        return copy.deepcopy(state)
    buffer = buffers.get(path)
    if buffer is None or buffer.shape != state.shape or buffer.dtype != state.dtype:
        buffer = buffers[path] = torch.empty(state.shape, dtype=state.dtype, pin_memory=state.is_cuda)
    return buffer.copy_(state.detach(), non_blocking=state.is_cuda)


def kept_host_copy_stager():
    """A stager for dcp.async_save that copies the shards into host buffers kept from the previous save
    (pinned on a GPU host, as copy_to_host does for whole models). DCP's default stager allocates pageable
    memory at every save, most of a large model's pause (benchmarks/RESULTS.md). Its base class's close()
    keeps the buffers, so it also survives torch versions that close a stager after one save."""
    from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
    from torch.distributed.checkpoint.staging import BlockingAsyncStager

    class Stager(BlockingAsyncStager):
        def __init__(self):
            super().__init__(cache_staged_state_dict=True)
            self.layout = None

        def stage(self, state_dict):
            layout = tensor_layout(state_dict)
            if self.state_dict_cache is None or layout != self.layout:  # e.g. AdamW state appeared
                pinned = torch.cuda.is_available()
                self.state_dict_cache = _create_cpu_state_dict(state_dict, pin_memory=pinned)
                self.layout = layout
            # Blocking copies: DCP's writer thread reads the copy as soon as this returns.
            return _copy_state_dict(state_dict, self.state_dict_cache)

    return Stager()


def tensor_layout(state, path: tuple = ()) -> list:
    """(path, shape, dtype) of every tensor in nested dicts and lists: whether a kept copy still fits."""
    if isinstance(state, dict):
        return [item for key, value in state.items() for item in tensor_layout(value, (*path, key))]
    if isinstance(state, (list, tuple)):
        return [item for i, value in enumerate(state) for item in tensor_layout(value, (*path, i))]
    if isinstance(state, torch.Tensor):
        return [(path, tuple(state.shape), state.dtype)]
    return []


class Checkpointer:
    """Writes checkpoints and hands them to Ray, in the background by default.

    Whole models (DDP): rank 0 writes out_dir/ckpt.pt (the newest, for nanoGPT-style tools) and hands
    Ray a folder holding the same file; the other ranks hand Ray None. Sharded models (FSDP): every
    rank writes its shards into a folder of its own and hands Ray that folder; Ray gathers the ranks'
    folders into one checkpoint. No consolidated ckpt.pt is written (raygpt.export makes one).

    Asynchronous: training pauses only while the state is copied to host memory; one background thread
    writes the copy, then reports it to Ray. A folder is reported only once it is completely written, so a
    crash mid-write leaves nothing registered (and remove_leftovers clears the folder). At most one save
    is in flight: the next waits for it, since it reuses its host buffers. The thread is the worker's
    OrderedRayCalls: every eval report and preemption poll goes through it too, so Ray sees them in order."""

    def __init__(self, out_dir: str | Path, rank: int, calls: OrderedRayCalls, sharded: bool = False,
                 checkpoint_type: type | None = None, say: Say | None = None):  # fmt: skip
        self.out_dir, self.rank, self.sharded = Path(out_dir), rank, sharded
        self.checkpoint_type = checkpoint_type  # what report() takes; None: ray.train.Checkpoint
        self.calls = calls  # writes and reports, in order with the preemption polls
        self.background = calls.background is not None  # asynchronous: written by the calls' thread
        self.say = say or Say(rank == 0)
        self.host_buffers: dict = {}
        self.stager = None  # the sharded saves' host copy, kept between saves like host_buffers
        self.process_group = None
        if self.background and sharded and torch.distributed.is_initialized():
            # The background write gathers its plan over gloo, apart from the group the training step uses.
            self.process_group = torch.distributed.new_group(backend="gloo")

    def save(self, state: TrainState, next_batch, report: Callable) -> None:
        """Write `state`, then call report(a Ray Checkpoint, or None on ranks that hand Ray nothing)."""
        if self.checkpoint_type is None:
            from ray.train import Checkpoint

            self.checkpoint_type = Checkpoint
        Checkpoint = self.checkpoint_type
        self.calls.raise_error()
        if self.background:
            self.calls.wait()  # one save in flight: its buffers are about to be reused
        started = time.perf_counter()
        if self.sharded:
            upload_dir, written = self._save_shards(state, next_batch)
        elif self.rank == 0:
            upload_dir, written = self._save_whole(state, next_batch)
        else:
            upload_dir, written = None, None
        if written is not None and torch.cuda.is_available():
            torch.cuda.synchronize()  # the host copies are complete before training changes the originals
        pause = time.perf_counter() - started
        summary, iter_num = state.summary(), state.iter_num  # training moves state on during a background write

        def finish() -> None:
            if written is not None:
                written()
            if self.rank == 0 and upload_dir is not None:
                write_text_atomic(upload_dir / SUMMARY_NAME, summary)
            report(Checkpoint.from_directory(str(upload_dir)) if upload_dir is not None else None)
            if upload_dir is not None:  # Ray has copied it into its storage
                shutil.rmtree(upload_dir, ignore_errors=True)
            if self.rank == 0:
                done = time.perf_counter() - started
                where = "sharded, one folder a rank" if self.sharded else self.out_dir / CKPT_NAME
                # Synchronous: training waited for all of it. Background: only for the host copy.
                paused, how = (pause, "in the background ") if self.background else (done, "")
                self.say(f"saved checkpoint at iter {iter_num} ({where}): training paused {paused:.2f}s, "
                      f"written and handed to Ray {how}in {done:.2f}s", flush=True)  # fmt: skip

        self.calls.submit(finish)

    def _save_whole(self, state: TrainState, next_batch) -> tuple[Path, Callable | None]:
        """Rank 0's ckpt.pt, hard-linked into a folder for Ray (a second copy would cost a second write)."""
        ckpt_path, upload_dir = self.out_dir / CKPT_NAME, self._upload_dir()
        whole = state.state_dict(next_batch)

        def write(whole=whole) -> None:
            save_atomic(whole, ckpt_path)
            try:
                os.link(ckpt_path, upload_dir / CKPT_NAME)
            except OSError:
                shutil.copy2(ckpt_path, upload_dir / CKPT_NAME)

        if not self.background:
            write()
            return upload_dir, None
        return upload_dir, functools.partial(write, copy_to_host(whole, self.host_buffers))

    def _save_shards(self, state: TrainState, next_batch) -> tuple[Path, Callable | None]:
        """Every rank writes its own __<rank>_0.distcp; rank 0 writes .metadata once all have finished, and
        train_state.pt."""
        import torch.distributed.checkpoint as dcp

        upload_dir = self._upload_dir()
        progress = state.progress(next_batch)
        if not self.background:
            dcp.save(state.sharded_state_dict(), checkpoint_id=str(upload_dir))
            if self.rank == 0:
                save_atomic(progress, upload_dir / PROGRESS_NAME)
            return upload_dir, None
        # The shards are copied to host memory now (into the buffers of the previous save); the returned
        # future finishes the write.
        self.stager = self.stager or kept_host_copy_stager()
        written = dcp.async_save(state.sharded_state_dict(), checkpoint_id=str(upload_dir),
                                 process_group=self.process_group, async_stager=self.stager)  # fmt: skip
        progress = copy.deepcopy(progress)

        def finish_write() -> None:
            written.result()
            if self.rank == 0:
                save_atomic(progress, upload_dir / PROGRESS_NAME)

        return upload_dir, finish_write

    def _upload_dir(self) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)  # on other nodes too
        return Path(tempfile.mkdtemp(prefix=UPLOAD_PREFIX, dir=self.out_dir))
