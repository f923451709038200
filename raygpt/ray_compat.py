"""Every private Ray API raygpt touches, each behind a small function with its fallback: the one file to
audit on a Ray upgrade. Each fallback keeps the run working as it would without raygpt's use of the API."""

from __future__ import annotations

import logging

# launcher side


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
