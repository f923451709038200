"""Every private Ray API raygpt uses, each in one small function with its fallback: one file to audit on a
Ray upgrade. Nothing else in raygpt names them. Ray is imported inside each function, so importing this
module costs nothing.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

# ---------------------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------------------

# Ray's key-value store (ray.experimental.internal_kv) carries four marks per launch, under raygpt's
# namespace: a worker group's start, a failure Ray Train saw, the launcher's SIGTERM, and why the checkpoint
# that SIGTERM asked for was not saved.
KV_NAMESPACE = "raygpt"


def started_key(launch_id: str) -> str:
    """Set by the launch's first worker group (raygpt.worker.startup.first_worker_group)."""
    return f"started-{launch_id}"


def failure_key(launch_id: str) -> str:
    """When Ray Train saw the launch's worker group fail (raygpt.worker.startup.FailureClock)."""
    return f"failed-{launch_id}"


def stop_key(launch_id: str) -> str:
    """The launcher got SIGTERM (raygpt.worker.preemption.ask_workers_to_stop)."""
    return f"stop-{launch_id}"


def not_saved_key(launch_id: str) -> str:
    """Why the checkpoint the launcher's SIGTERM asked for was not saved (raygpt.worker.preemption.not_saved)."""
    return f"not-saved-{launch_id}"


def kv_put_once(key: str) -> bool | None:
    """Mark `key`: True where this call set it, False where it was set already, None where the store
    cannot be asked (a private Ray API, which may move)."""
    try:
        from ray.experimental.internal_kv import _internal_kv_put

        return not _internal_kv_put(key, b"1", overwrite=False, namespace=KV_NAMESPACE)
    except Exception:  # noqa: BLE001 - the caller's fallback: unknown
        return None


def kv_put(key: str, value: bytes) -> bool:
    """Set `key` to `value`; False where that cannot be done."""
    try:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(key, value, overwrite=True, namespace=KV_NAMESPACE)
        return True
    except Exception:  # noqa: BLE001 - the caller's fallback
        return False


def kv_take(key: str) -> bytes | None:
    """The value of `key`, deleted as it is read; None where there is none or the store cannot be asked."""
    try:
        from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get

        value = _internal_kv_get(key, namespace=KV_NAMESPACE)
        if value is not None:
            _internal_kv_del(key, namespace=KV_NAMESPACE)
        return value
    except Exception:  # noqa: BLE001 - the caller's fallback: none
        return None


def kv_exists(key: str) -> bool:
    """Whether `key` is set; False where the store cannot be asked."""
    try:
        from ray.experimental.internal_kv import _internal_kv_exists

        return bool(_internal_kv_exists(key, namespace=KV_NAMESPACE))
    except Exception:  # noqa: BLE001 - the caller's fallback: not set
        return False


def _leave_process_group(self, worker_group, backend_config) -> None:
    pass


@functools.cache
def torch_backend_without_teardown() -> type | None:
    """Ray's torch backend (ray.train.torch.config._TorchBackend) with the same set-up and no teardown;
    None where the private class moved (the caller then keeps Ray's own backend and its shutdown)."""
    try:
        from ray.train.torch.config import _TorchBackend
    except ImportError:  # pragma: no cover - depends on the Ray version
        return None
    return type("NoTeardownBackend", (_TorchBackend,), {"on_shutdown": _leave_process_group, "__module__": __name__})


# Ray Train's preemption watcher (drained nodes -> each worker's ray.train.get_preemption_info) is an actor
# that Ray restarts (max_restarts=-1) and that gets the workers' actor handles as constructor arguments. An
# actor handle is an object reference, and Ray Core logs an error (core_worker.cc, in the controller's
# process, so on the launcher's console) for every restartable actor created with references among its
# arguments, since it cannot always restart one (ray-project/ray#53727). The same watcher started on the
# controller's own node needs no restart: it goes only where the controller goes, and then the run does.
WATCHER_SWITCH = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
EXTRA_CALLBACKS = "RAY_TRAIN_CALLBACKS"  # import paths of callbacks Ray Train adds to every run, comma-separated
WATCHER_CALLBACK = "PreemptionWatcherBesideController"


def preemption_watcher_on(default: bool) -> bool:
    """Whether this process's settings watch for drained nodes: Ray's switch, or this module's watcher among
    the extra callbacks (which turned the switch off); `default` where neither says."""
    if f"{__name__}.{WATCHER_CALLBACK}" in os.environ.get(EXTRA_CALLBACKS, "").split(","):
        return True
    return os.environ.get(WATCHER_SWITCH, "1" if default else "0").strip().lower() in ("1", "true")


def preemption_watcher_settings(watch: bool) -> dict[str, str]:
    """The Ray Train settings (environment variables of the process that calls fit()) that watch for drained
    nodes, or not. Watching: Ray's own watcher off and this module's WATCHER_CALLBACK on, through Ray's
    setting for extra callbacks; where Ray's private classes moved, Ray's own watcher, with its error line."""
    ours = f"{__name__}.{WATCHER_CALLBACK}"
    others = [path for path in os.environ.get(EXTRA_CALLBACKS, "").split(",") if path.strip() and path != ours]
    ours_on = watch and preemption_watcher_beside_controller() is not None
    settings = {WATCHER_SWITCH: "1" if watch and not ours_on else "0"}
    if ours_on or EXTRA_CALLBACKS in os.environ:
        settings[EXTRA_CALLBACKS] = ",".join([*others, ours] if ours_on else others)
    return settings


def __getattr__(name: str):
    """WATCHER_CALLBACK, built when Ray Train imports it by name: importing this module imports no Ray."""
    if name == WATCHER_CALLBACK and preemption_watcher_beside_controller() is not None:
        return preemption_watcher_beside_controller()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def preemption_watcher_beside_controller() -> type | None:
    """Ray Train's preemption callback (private: ray.train.v2._internal.callbacks.preemption_callback), whose
    watcher (ray.train.v2._internal.execution.preemption.PreemptionWatcher) is started on the controller's
    node with no restarts; None where either moved. Should a worker group come without the fields read
    here, that run gets Ray's own watcher."""
    try:
        from ray.train.v2._internal.callbacks.preemption_callback import PreemptionCallback
        from ray.train.v2._internal.execution.preemption import PreemptionWatcher
    except ImportError:  # pragma: no cover - depends on the Ray version
        return None
    takes = inspect.signature(PreemptionWatcher.__init__).parameters
    if not {"node_to_ranks", "poll_interval_s", "worker_actors_by_rank"} <= set(takes) or not hasattr(
        PreemptionCallback, "_stop_watcher"
    ):  # pragma: no cover - depends on the Ray version
        return None

    def after_worker_group_start(self, worker_group) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        try:
            ranks_by_node, worker_by_rank = {}, {}
            for worker in worker_group.get_workers():
                rank = worker.distributed_context.world_rank
                ranks_by_node.setdefault(worker.metadata.node_id, []).append(rank)
                worker_by_rank[rank] = worker.actor
            poll_interval_s = self._poll_interval_s
        except AttributeError:  # pragma: no cover - depends on the Ray version
            PreemptionCallback.after_worker_group_start(self, worker_group)
            return
        self._stop_watcher()  # the previous worker group's
        controller_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        watcher = ray.remote(PreemptionWatcher).options(num_cpus=0, scheduling_strategy=controller_node)
        self._watcher = watcher.remote(
            node_to_ranks=ranks_by_node, poll_interval_s=poll_interval_s, worker_actors_by_rank=worker_by_rank
        )

    members = {"after_worker_group_start": after_worker_group_start, "__module__": __name__}
    return type(WATCHER_CALLBACK, (PreemptionCallback,), members)


def tune_stop_event() -> Callable[[], bool]:
    """Whether Tune has stopped this trial, read from its session's stop event (ray.train._internal.session,
    a private attribute); where it is missing, never (trials end at their next report, as Tune means them to)."""
    try:
        from ray.train._internal.session import get_session
    except ImportError:  # pragma: no cover - depends on the Ray version
        return lambda: False
    stop_event = getattr(get_session(), "stop_event", None)
    return stop_event.is_set if stop_event is not None else (lambda: False)


# ---------------------------------------------------------------------------------------------------------
# launcher side
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def ray_processes_in_their_own_session():
    """While Ray starts here (ray.init without a cluster to join), its processes (GCS, raylet, dashboard,
    and through the raylet every worker) start in a session of their own instead of the launcher's process
    group. A signal to that group (what `timeout`, `kill -- -PGID`, a closing terminal and batch schedulers
    send) then reaches the launcher alone, which hands it to the workers to checkpoint, instead of killing
    Ray under the run. Ray has no setting for this: its processes are started by the private
    ray._private.services.ConsolePopen, replaced here by one with start_new_session. They still end with
    the launcher, since Ray ties each to it with PR_SET_PDEATHSIG (its kernel fate-sharing); only where
    Ray does (Linux) is the session changed: elsewhere Ray's reaper ends them by killing the launcher's
    process group, which they must then stay in. If the class moves, Ray starts them as before."""
    try:
        from ray._private import services, utils

        popen = services.ConsolePopen
        fate_shared = sys.platform.startswith("linux") and utils.detect_fate_sharing_support()
    except (ImportError, AttributeError):  # pragma: no cover - depends on the Ray version
        fate_shared = False
    if not fate_shared:
        yield
        return

    class OwnSessionPopen(popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "start_new_session": True})

    services.ConsolePopen = OwnSessionPopen
    try:
        yield
    finally:
        services.ConsolePopen = popen


# The variable Ray's job supervisor hands a job's driver its config in (runtime_env, metadata): Ray's private
# ray._private.runtime_env.constants.RAY_JOB_CONFIG_JSON_ENV_VAR, spelled out so that reading it imports no Ray.
JOB_CONFIG_VARIABLE = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def local_cluster_file() -> Path:
    """The file where `ray start` records the cluster a plain ray.init() joins: ray_current_cluster in Ray's
    default temp folder ($RAY_TMPDIR, else $TMPDIR on Linux, else /tmp; then /ray)."""
    try:
        from ray._common.utils import get_ray_address_file

        return Path(get_ray_address_file(None))
    except (ImportError, AttributeError, TypeError):
        system = os.environ.get("RAY_TMPDIR") or (
            os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None
        )
        return Path(system or "/tmp") / "ray" / "ray_current_cluster"


def job_working_dir() -> str | None:
    """The runtime_env working_dir (`ray job submit --working-dir`) of the Ray job this process is the
    driver of, or None: not a job's driver, or a job without one. Ray starts such a driver inside its copy
    of that folder (under the session's runtime_resources), which it deletes when the job ends. Ray sets
    no public variable for a job's driver; if this private one is renamed, None: paths resolve as anywhere."""
    try:
        job_config = json.loads(os.environ.get(JOB_CONFIG_VARIABLE) or "{}")
        working_dir = (job_config.get("runtime_env") or {}).get("working_dir")
    except (ValueError, AttributeError):  # not the JSON object Ray writes
        return None
    return working_dir if isinstance(working_dir, str) and working_dir else None


@contextlib.contextmanager
def ray_started_here_at_a_known_address():
    """While Ray starts here (ray.init(address="local")): its GCS takes a port chosen now, and RAY_ADDRESS
    names it in the environment that Ray's processes, and through the raylet every worker, inherit. Ray's
    lookups without an address, in a worker (Train's placement group cleaner asks Ray's state API about the
    controller every second), then find this cluster; without it they search the machine for Ray's GCS
    processes and refuse, every time, where another Ray runs ("Found multiple active Ray instances"). The
    port goes through RAY_GCS_SERVER_PORT, which ray.init reads for the head it starts but does not
    document: if Ray stops naming it, nothing is set. This process's own environment is put back after."""
    try:
        from ray._private.ray_constants import GCS_PORT_ENVIRONMENT_VARIABLE as port_setting
        from ray.util import get_node_ip_address
    except ImportError:  # pragma: no cover - depends on the Ray version
        yield
        return
    port = os.environ.get(port_setting) or str(unused_port())
    host = get_node_ip_address()  # the address Ray gives the node it starts
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    before = {name: os.environ.get(name) for name in (port_setting, "RAY_ADDRESS")}
    os.environ.update({port_setting: port, "RAY_ADDRESS": address})
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def unused_port() -> int:
    """A TCP port nothing listens on now, as Ray chooses its own (the kernel's pick)."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def hide_token_auth_notice() -> None:
    """Ray announces at start that token authentication is on (the default): nothing to act on. Its
    logger is a private module's: if it moves, the notice is printed as before."""
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)


def forward_worker_output(enabled: bool) -> None:
    """Whether this driver prints what its Ray workers print: Ray's own switch, which its debugger also
    turns off. A private flag: if it moves, workers' output is printed as before."""
    try:
        import ray._private.worker

        ray._private.worker._worker_logs_enabled = enabled
    except (ImportError, AttributeError):
        pass


def start_autoscaling_coordinator() -> None:
    """Start the actor Train V2's controller registers its resource request with, so that it is up by then.

    The controller creates it on first use and waits at most 5 s for it; a fresh process that must import
    ray.data takes about that long on a busy machine, and then each run starts with a warning and a
    traceback ("Failed to send resource request") after that 5 s stall.
    Creating it here, while the driver goes on preparing the run, is the same call with get_if_exists,
    so a cluster that already has one keeps it. A private Ray API: if it moves, Ray creates the actor as before."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        get_or_create_autoscaling_coordinator()
    except Exception:  # noqa: BLE001 - an optimization only
        pass


def with_sigint_handler(trainer_class, install):
    """`trainer_class` whose fit() calls `install(trainer, controller)` in place of installing Ray Train's
    own Ctrl-C handler (the private `_register_sigint_handler`). If Ray renames that method, the override
    is never called and Ray's own handler stays: Ctrl-C still stops the run, with Ray's last words."""

    class Trainer(trainer_class):
        def _register_sigint_handler(self, controller) -> None:
            install(self, controller)

    return Trainer
