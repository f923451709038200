"""The torch process group Ray Train sets up for the workers, ended without waiting on a dead peer.

Ray Train ends a worker group (after a failure, for an elastic resize, at the end of the run) by asking
each worker to destroy its process group and then killing every worker process anyway. After a worker
died, a survivor's destroy waits on collectives the dead rank never joins (NCCL), and the worker cannot
answer Ray's shutdown call until it returns: Ray waits out its patience (5 s) before it kills the worker
and starts the new group. The process is killed either way, so raygpt's backend leaves the group to die
with it; set-up is Ray's own.

FailureClock notes when Ray Train saw a worker group fail, for the restarted group's start-up line.
"""

from __future__ import annotations

import time

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
