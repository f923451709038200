"""The torch process group Ray Train sets up for the workers, ended without waiting on a dead peer.

Ray Train ends a worker group (after a failure, for an elastic resize, at the end of the run) by asking
each worker to destroy its process group and then killing every worker process anyway. After a worker
died, a survivor's destroy waits on collectives the dead rank never joins (NCCL), and the worker cannot
answer Ray's shutdown call until it returns: Ray waits out its patience (5 s) before it kills the worker
and starts the new group. The process is killed either way, so raygpt's backend leaves the group to die
with it; set-up is Ray's own.

CommunicatorWarmup makes NCCL's communicator while the worker builds its model, not at DDP's wrap.
FailureClock notes when Ray Train saw a worker group fail, for the restarted group's start-up line.
"""

from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist
from ray.train import UserCallback
from ray.train.torch import TorchConfig

from raygpt.worker.preemption import KV_NAMESPACE

try:  # a private class: where it moves, Ray's own backend (and its shutdown) is used
    from ray.train.torch.config import _TorchBackend
except ImportError:  # pragma: no cover - depends on the Ray version
    _TorchBackend = None


class NoTeardownTorchConfig(TorchConfig):
    """Ray's TorchConfig, whose backend leaves the process group to die with the killed worker."""

    @property
    def backend_cls(self):
        return NoTeardownBackend if _TorchBackend is not None else super().backend_cls


if _TorchBackend is not None:

    class NoTeardownBackend(_TorchBackend):
        """Ray's torch backend: the same set-up, no teardown (Ray kills the workers right after)."""

        def on_shutdown(self, worker_group, backend_config) -> None:
            pass


class CommunicatorWarmup:
    """NCCL makes a process group's communicator at its first collective, which blocks that rank until
    every rank has joined (DDP's first broadcast in the wrap, FSDP's first all-gather). start() makes it
    now, in a thread: the collective releases the GIL, so the checkpoint read and the model build go on
    meanwhile. wait() before any other collective: the warm-up must be each rank's first."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled = device, enabled
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @classmethod
    def for_worker(cls, world_size: int, device: torch.device) -> CommunicatorWarmup:
        """Gloo connects at init_process_group: only an NCCL group has anything left to make."""
        nccl = world_size > 1 and dist.is_initialized() and dist.get_backend() == "nccl"
        return cls(device, enabled=nccl and device.type == "cuda")

    def start(self) -> None:
        if self.enabled:
            # A daemon: a rank stuck here because a peer died must not keep its process alive.
            self.thread = threading.Thread(target=self._warm, name="communicator-warmup", daemon=True)
            self.thread.start()

    def _warm(self) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # the current device is per thread
            one = torch.ones(1, device=self.device)
            dist.all_reduce(one)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except BaseException as error:  # noqa: BLE001 - raised again by wait(), in the loop's thread
            self.error = error

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def failure_key(launch_id: str) -> str:
    return f"failed-{launch_id}"


class FailureClock(UserCallback):
    """In Ray Train's controller: when it saw a worker fail, kept in Ray's key-value store under the
    launch, so the restarted group's start-up line can count from the failure (raygpt.worker.loop)."""

    def __init__(self, launch_id: str):
        self.launch_id = launch_id

    def after_exception(self, run_context, worker_exceptions) -> None:
        try:
            from ray.experimental.internal_kv import _internal_kv_put

            seen = str(time.time()).encode()
            _internal_kv_put(failure_key(self.launch_id), seen, overwrite=True, namespace=KV_NAMESPACE)
        except Exception:  # noqa: BLE001 - a private Ray API; only the start-up line depends on it
            pass
