"""The first half of a launch, shared by raygpt.launch and raygpt.tune: the launcher's own options, and
prepare_run (preflight, then Ray, then the plan from what Ray has)."""

from __future__ import annotations

import argparse
import dataclasses
import time
import uuid
from dataclasses import dataclass

from raygpt.config.schema import TrainConfig
from raygpt.driver.identity import record_run
from raygpt.driver.plan import RunPlan, plan_resources
from raygpt.driver.preflight import preflight
from raygpt.driver.ray_cluster import connect
from raygpt.driver.runlock import RunLock


@dataclass(frozen=True)
class LauncherOptions:
    """The launcher's own options (not config keys): where Ray is, and how the launcher behaves."""

    address: str | None = None  # a Ray cluster to join; None: RAY_ADDRESS, a local `ray start` one, or a new one
    wait_for_resources: bool = False  # do not refuse what the cluster cannot hold now (autoscaling)
    prepare_input: str | None = None  # a local text file to prepare a missing shakespeare dataset from
    verbose: bool = False  # Ray's own log lines too


def prepare_run(
    cfg: TrainConfig, explicit_keys=(), options: LauncherOptions = LauncherOptions(), new_runs: bool = False
) -> tuple[TrainConfig, RunPlan, RunLock]:
    """Everything before fit(). What needs no cluster comes first (preflight), so a bad input costs no Ray
    start; then Ray, and the resources planned from what it has. Returns the config with its paths
    absolute, the plan, and the run's lock: the caller releases it when the run has ended."""
    launched_at = time.time()
    checked = preflight(cfg, explicit_keys, options.prepare_input, options.address, new_runs)
    cfg = checked.cfg
    try:
        if not cfg.local_mode:
            connect(options.address, options.verbose)
        plan = plan_resources(cfg, options.wait_for_resources)
        record_run(cfg, checked.identity)  # accepted: the run's identity goes where its checkpoints live
    except BaseException:  # a refusal (or Ctrl-C) leaves no lock file or empty folder behind
        checked.discard()
        raise
    resume_from = None if checked.resume is None or checked.resume.in_ray_run else str(checked.resume.source)
    plan = dataclasses.replace(plan, launched_at=launched_at, ray_ready_at=time.time(), launch_id=uuid.uuid4().hex,
                               resume_from=resume_from)  # fmt: skip
    return cfg, plan, checked.lock


def add_launcher_options(parser: argparse.ArgumentParser) -> None:
    """The options raygpt.launch and raygpt.tune share (LauncherOptions)."""
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="Ray cluster to join (default: RAY_ADDRESS, else one started here by ray start, else a new one)",
    )
    parser.add_argument(
        "--wait-for-resources",
        action="store_true",
        help="do not refuse a run the cluster cannot hold now (autoscaling clusters)",
    )
    parser.add_argument(
        "--prepare-input",
        metavar="FILE",
        help="local text file to prepare a missing shakespeare dataset from (default: download it)",
    )
