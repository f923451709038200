"""Connecting the launcher to Ray: join a cluster (an address, RAY_ADDRESS, or one `ray start` began on this
machine) or start one here, and the environment Ray and its workers get (quiet logs, credentials, settings
for a Ray started here, the preemption watcher, and which cluster is theirs)."""

from __future__ import annotations

import logging
import os
import socket
import sys
from contextlib import nullcontext
from pathlib import Path

from raygpt.errors import LaunchError, one_line
from raygpt.ray_compat import (
    hide_token_auth_notice,
    local_cluster_file,
    preemption_watcher_on,
    preemption_watcher_settings,
    ray_processes_in_their_own_session,
    ray_started_here_at_a_known_address,
    start_autoscaling_coordinator,
)


def quiet_ray() -> None:
    """Keep the console to raygpt's lines: no usage-stats notice, no duplicated worker prints
    (Train V2 copies print() into its own logger)."""
    for name, value in (
        ("RAY_USAGE_STATS_ENABLED", "0"),
        ("RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING", "0"),
        ("RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING", "0"),
        # The controller collects reports at this interval; a report waits for the
        # previous one to be collected, and fit() for the workers' end (default 2 s).
        ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
    ):
        os.environ.setdefault(name, value)


def connect(address: str | None, verbose: bool = False) -> None:
    """Join the cluster at `address` / RAY_ADDRESS, or start an embedded local Ray.

    What Ray prints is set through Ray's own settings: unless `verbose`, Ray's actors and workers log at
    WARNING (the controller's INFO lines about worker groups go), and a job logging config makes Ray
    forward worker output without its "(RayTrainWorker pid=...)" prefix, so rank 0's lines read as
    nanoGPT's do. Without a terminal, Ray adds no colour codes."""
    import ray

    if ray.is_initialized():
        return
    quiet_ray()
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if not verbose:
        hide_token_auth_notice()
    # Ray's own rule: an address (or RAY_ADDRESS) joins that cluster; without one, a cluster started on
    # this machine with `ray start` is joined (Ray records it in its temp folder), else one starts here.
    address, source = given_address(address)
    if address:
        check_address(address, source)
    joined = bool(address) or recorded_cluster_answers(local_cluster_file())
    if not joined:
        for name, value in LOCAL_RAY_SETTINGS.items():
            os.environ.setdefault(name, value)
    train_settings = watch_preemption(joined)
    # A Ray started here lives outside the launcher's process group: SIGTERM to the group (`timeout`, a batch
    # scheduler) must leave it running while the workers save their checkpoint. Its workers, as a joined
    # cluster's (joined_runtime_env), know which cluster is theirs.
    try:
        with (
            ray_processes_in_their_own_session(),
            ray_started_here_at_a_known_address() if not joined else nullcontext(),
        ):
            context = ray.init(
                address=address if joined else "local",
                runtime_env=joined_runtime_env(job_runtime_env(joined), train_settings) if joined else None,
                logging_level=logging.WARNING,
                logging_config=None if verbose else ray.LoggingConfig(encoding="TEXT", log_level="WARNING"),
            )
    except (ConnectionError, ValueError, TimeoutError) as e:  # Ray's own words, on one line
        where = f"the Ray cluster at {address}" if address else "the Ray cluster started on this machine"
        raise LaunchError(f"cannot join {where}: {one_line(str(e)) or type(e).__name__}") from None
    gcs = context.address_info.get("gcs_address") or context.address_info.get("address")
    how = "joined the Ray cluster" if joined else "started a Ray instance here (it stops with this run)"
    print(f"raygpt: {how} at {gcs}", flush=True)
    start_autoscaling_coordinator()


def watch_preemption(joined: bool) -> dict[str, str]:
    """Whether Ray Train watches for drained nodes (-> the loop's notice checkpoint): on a joined cluster,
    unless RAY_TRAIN_ENABLE_PREEMPTION_WATCHER says otherwise; a Ray started here is never drained. Set
    before Ray starts, so that a Ray started here hands it on to its workers (Tune trials call fit() there).
    Returns the settings."""
    settings = preemption_watcher_settings(preemption_watcher_on(default=joined))
    os.environ.update(settings)
    return settings


def joined_runtime_env(runtime_env: dict | None, train_settings: dict[str, str]) -> dict:
    """`runtime_env` with a hook (Ray's worker_process_setup_hook) run in every worker process of the job.
    It sets RAY_ADDRESS to the worker's own cluster: Ray's lookups without an address (Train's placement
    group cleaner asks Ray's state API about the controller every second) search the machine for Ray
    instances otherwise, and refuse, or warn, every time, where another Ray runs there. And it hands on
    `train_settings`, for the Tune trials that call fit() there, as a Ray started here does through its
    environment. The hook is defined here, so Ray ships it by value: it needs no raygpt on the node."""

    def set_up_worker() -> None:
        try:  # never raises: a failing hook would stop the worker
            import ray

            os.environ.update(train_settings)
            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        except Exception:  # noqa: BLE001 - Ray's lookups then search as before
            pass

    return {**(runtime_env or {}), "worker_process_setup_hook": set_up_worker}


def given_address(address: str | None) -> tuple[str | None, str]:
    """The cluster to join, --address or else RAY_ADDRESS (None: start one here), and which named it."""
    if address:
        return address, "--address"
    return os.environ.get("RAY_ADDRESS") or None, "RAY_ADDRESS"


ADDRESS_TIMEOUT_S = 5  # a head that does not answer a TCP connect in this long is not there


def recorded_cluster_answers(record: Path) -> bool:
    """Whether the cluster `ray start` recorded on this machine is there to join. A cluster stopped without
    `ray stop` (its `ray start` process killed, a reboot) leaves its record behind, and ray.init would
    retry its address forever: such a record is named, and a Ray instance starts here instead."""
    try:
        address = record.read_text().strip()
    except OSError:
        return False
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=ADDRESS_TIMEOUT_S).close()
        return True
    except (OSError, ValueError):
        print(f"raygpt: the Ray cluster recorded in {record} ({address}) does not answer: it was stopped without "
              "`ray stop`; starting a Ray instance here (--address joins another)", flush=True)  # fmt: skip
        return False


def check_address(address: str, source: str) -> None:
    """A Ray address is HOST:PORT (or ray://HOST:PORT, or Ray's words auto and local) and something
    listens there: ray.init retries an address that does not answer for minutes, logging as it goes."""
    if address in ("auto", "local") or ("://" in address and not address.startswith("ray://")):
        return  # Ray's own lookups, or a scheme Ray decides on (its error is caught in connect)
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
        raise LaunchError(
            f"{source} {address!r} is not a Ray address: use HOST:PORT, the address `ray start --head` "
            "printed (e.g. 10.0.0.1:6379), or leave it out to start Ray here"
        )
    try:
        socket.create_connection((host, int(port)), timeout=ADDRESS_TIMEOUT_S).close()
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise LaunchError(
            f"cannot reach the Ray cluster at {address} ({source}): {reason}; is `ray start --head` running "
            "there, on that port?"
        ) from None


# Settings for a Ray this launcher starts itself (a joined cluster keeps its own); its raylet reads them
# from this process's environment.
LOCAL_RAY_SETTINGS = {
    # Ray starts one idle Python process per CPU for the first driver, with no runtime_env. Every actor of
    # a Train run has one (Ray Train hands its env vars to the controller and the workers), and Ray gives
    # an actor only an idle process of the same runtime_env, so none of them is used: they only take CPU
    # while the run starts (and on a many-core GPU host, one process per core).
    "RAY_prestart_worker_first_driver": "0",
}

# Object storage settings the workers and Ray's controller need as much as this process does.
CREDENTIAL_PREFIXES = ("AWS_", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_")


def job_runtime_env(joined: bool) -> dict | None:
    """The storage settings for a joined cluster's workers, or None for a Ray started here: its workers
    inherit this process's environment, and a job runtime_env would keep even the actors Ray Train does
    not give one (the autoscaling coordinator) off Ray's idle processes."""
    credentials = storage_credentials()
    return {"env_vars": credentials} if joined and credentials else None


def storage_credentials() -> dict[str, str]:
    """This process's object storage variables (endpoint, keys, region), for every process of the run:
    workers on other nodes do not share this shell's environment."""
    return {name: value for name, value in os.environ.items() if name.startswith(CREDENTIAL_PREFIXES)}
