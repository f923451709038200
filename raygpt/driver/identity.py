"""Which run a launch is: a run's identity, recorded where its checkpoints live.

A run is named by its run_name (by default out_dir's folder name), and names collide: two projects whose
out_dirs are both `.../out` would share Ray run 'out' in the default storage. So a run also gets an id
at its first launch, written to `raygpt-run.json` in out_dir and in Ray's run folder
(storage_path/run_name), with the run name and the out_dir it was launched with. A launch compares the
two (for a Ray run from before run records, its latest checkpoint's out_dir): a Ray run that belongs to
another out_dir is refused in one line (Ray mode), or left alone (local mode, which writes no Ray
storage); a run's own Ray checkpoints are then candidates for its resume,
local mode's included.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from raygpt.config.schema import TrainConfig
from raygpt.core import checkpoint
from raygpt.driver.plan import ray_run_checkpoints
from raygpt.errors import LaunchError
from raygpt.storage.uri import StorageError, join_uri, read_small_file, storage_root, write_small_file

RECORD_NAME = "raygpt-run.json"


@dataclass(frozen=True)
class RunIdentity:
    run_id: str  # "" for a sweep's base config, whose trials are new runs of their own
    run_name: str
    ray_run_is_ours: bool  # Ray's run folder of run_name holds this run's checkpoints (or none yet)


def ray_run_folder(cfg: TrainConfig, run_name: str) -> str:
    return join_uri(storage_root(cfg.storage_path), run_name)


def read_record(folder: str) -> dict | None:
    """The run record in `folder` (out_dir or a Ray run folder), or None: none, or not one raygpt wrote."""
    data = read_small_file(join_uri(folder, RECORD_NAME))
    try:
        record = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("run_id"), str) else None


def read_ray_record(cfg: TrainConfig, run_name: str) -> dict | None:
    """Ray run `run_name`'s record. Local mode only reads Ray storage (for the run's own checkpoints):
    storage it cannot reach is named in a warning, and the run goes on from out_dir alone."""
    try:
        return read_record(ray_run_folder(cfg, run_name))
    except StorageError as e:
        if not cfg.local_mode:
            raise
        print(f"raygpt: warning: {e}; local mode continues from out_dir's checkpoint only", flush=True)
        return None


def identify_run(cfg: TrainConfig, new_runs: bool = False) -> RunIdentity:
    """This launch's run: out_dir's record names it (and, unless --run_name says otherwise, its run name);
    a Ray run of that name that is another run's, or another out_dir's, is refused (Ray mode) or not
    used (local mode)."""
    out_record = read_record(cfg.out_dir)
    run_name = cfg.run_name or (out_record or {}).get("run_name") or Path(cfg.out_dir).name
    if new_runs:
        return RunIdentity("", run_name, ray_run_is_ours=True)
    ray_owner = ray_run_owner(cfg, run_name)
    if ray_owner is None:
        others = False
    elif out_record is not None and ray_owner["run_id"] is not None:
        others = ray_owner["run_id"] != out_record["run_id"]
    else:
        others = ray_owner["out_dir"] != cfg.out_dir
    if out_record is not None:
        run_id = out_record["run_id"]
    else:
        run_id = ray_owner["run_id"] if ray_owner and not others and ray_owner["run_id"] else uuid.uuid4().hex
    if others and not cfg.local_mode:
        theirs = f"run {ray_owner['run_id'][:8]}" if ray_owner["run_id"] else "the run"
        this = f"out_dir {cfg.out_dir}" + (f" (run {run_id[:8]})" if out_record else "")
        raise LaunchError(
            f"Ray run '{run_name}' in {storage_root(cfg.storage_path)} is {theirs} of out_dir {ray_owner['out_dir']}, "
            f"not of {this}: pass --run_name=NEW to give this one a Ray run of its own"
            + ("" if out_record else f", or --out_dir={ray_owner['out_dir']} to continue that one")
        )
    ray_run_is_ours = not others if not cfg.local_mode else ray_owner is not None and not others
    return RunIdentity(run_id, run_name, ray_run_is_ours)


def ray_run_owner(cfg: TrainConfig, run_name: str) -> dict | None:
    """The run_id (None: not recorded) and out_dir of Ray run `run_name`: its record, or for a run that
    raygpt wrote before run records, the out_dir in its latest checkpoint's config. None: no such run."""
    record = read_ray_record(cfg, run_name)
    if record is not None:
        return {"run_id": record["run_id"], "out_dir": record.get("out_dir")}
    if cfg.local_mode:
        return None  # local mode continues no unrecorded Ray run: it never did
    checkpoints = ray_run_checkpoints(cfg, run_name)
    try:
        saved_config = checkpoint.read_summary(checkpoints[-1])["config"] if checkpoints else {}
    except checkpoint.CheckpointError:
        saved_config = {}  # a damaged latest: the resume decision reports it
    owner = saved_config.get("out_dir")
    return {"run_id": None, "out_dir": owner} if isinstance(owner, str) else None


def record_run(cfg: TrainConfig, identity: RunIdentity) -> None:
    """Write the run's record to out_dir and, in Ray mode, to its Ray run folder (once the launch is
    accepted: a refused launch leaves nothing behind)."""
    if not identity.run_id:
        return
    record = json.dumps({"run_id": identity.run_id, "run_name": identity.run_name, "out_dir": cfg.out_dir})
    write_small_file(join_uri(cfg.out_dir, RECORD_NAME), record)
    if not cfg.local_mode:
        write_small_file(join_uri(ray_run_folder(cfg, identity.run_name), RECORD_NAME), record)
