"""`python -m raygpt.launch [CONFIG_FILE] [--num-workers N] [--key=value ...]`: config -> TorchTrainer.fit().

The only module that builds Ray configs. Everything that can be checked before a worker starts is
checked here (config, data, cluster resources, the checkpoint to resume), each failure one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from raygpt.config.schema import DEFAULTS, TrainConfig, config_help, read_config
from raygpt.core import checkpoint
from raygpt.core.data import validate_dataset
from raygpt.core.model import HF_REPOS, check_gpt2_available
from raygpt.core.tokenizer import GPT2_VOCAB_SIZE, PADDED_GPT2_VOCAB_SIZE, load_meta, vocabulary
from raygpt.driver.plan import RunPlan
from raygpt.driver.runlock import RunLock, lock_run
from raygpt.errors import EXIT_INTERRUPTED, EXIT_REFUSED, OneLineParser, RaygptError, one_line, refuse
from raygpt.processes import packages_without_bytecode
from raygpt.storage.datasets import DatasetNotFoundError, check_remote_dataset, dataset_uri
from raygpt.storage.files import remove_empty_folders
from raygpt.storage.uri import (
    check_local_path,
    check_storage_path,
    is_uri,
    join_uri,
    list_folders,
    read_small_file,
    storage_root,
)
from raygpt.worker.preemption import EXIT_TERMINATED, Terminated, ask_workers_to_stop, handle_sigterm
from raygpt.worker.reporting import EVAL_NAME

PREPARABLE = ("shakespeare_char", "shakespeare")


class LaunchError(RaygptError, RuntimeError):
    """Something the launcher found wrong before training started; the message is one line."""


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Ray workers chdir into a session folder, so every path must be absolute in the driver."""

    def resolve(key: str) -> str:
        path = getattr(cfg, key)
        if is_uri(path) and key == "out_dir":
            raise LaunchError(f"out_dir {path} is a URI, but out_dir is each node's local folder: "
                              "pass a local --out_dir, and the URI as --storage_path")  # fmt: skip
        if is_uri(path):
            return path
        check_local_path(path, key)  # s3:/bucket resolved would be a local folder named 's3:'
        return str(Path(path).expanduser().resolve())

    changes = dict(out_dir=resolve("out_dir"), data_dir=resolve("data_dir"))
    if cfg.storage_path:
        changes["storage_path"] = resolve("storage_path")
    return cfg.replace(**changes)


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
        # Ray announces at start that token authentication is on (the default): nothing to act on.
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    # Ray's own rule: an address (or RAY_ADDRESS) joins that cluster; without one, a cluster started on
    # this machine with `ray start` is joined (Ray records it in its temp folder), else one starts here.
    address, source = given_address(address)
    if address:
        check_address(address, source)
    local_cluster = Path(os.environ.get("RAY_TMPDIR", "/tmp/ray")) / "ray_current_cluster"
    joined = bool(address) or local_cluster.is_file()
    if not joined:
        for name, value in LOCAL_RAY_SETTINGS.items():
            os.environ.setdefault(name, value)
    try:
        context = ray.init(
            address=address,
            runtime_env=job_runtime_env(joined),
            logging_level=logging.WARNING,
            logging_config=None if verbose else ray.LoggingConfig(encoding="TEXT", log_level="WARNING"),
        )
    except (ConnectionError, ValueError, TimeoutError) as e:  # Ray's own words, on one line
        where = f"the Ray cluster at {address}" if address else "the Ray cluster started on this machine"
        raise LaunchError(f"cannot join {where}: {one_line(str(e)) or type(e).__name__}") from None
    # Ray's preemption watcher (drained nodes -> the loop's notice checkpoint) matters only on a cluster
    # joined here; on the Ray started here it would only log an error line at each start.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1" if joined else "0")
    gcs = context.address_info.get("gcs_address") or context.address_info.get("address")
    how = "joined the Ray cluster" if joined else "started a Ray instance here (it stops with this run)"
    print(f"raygpt: {how} at {gcs}", flush=True)
    start_autoscaling_coordinator()


def given_address(address: str | None) -> tuple[str | None, str]:
    """The cluster to join, --address or else RAY_ADDRESS (None: start one here), and which named it."""
    if address:
        return address, "--address"
    return os.environ.get("RAY_ADDRESS") or None, "RAY_ADDRESS"


ADDRESS_TIMEOUT_S = 5  # a head that does not answer a TCP connect in this long is not there


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


def count(n: float, noun: str) -> str:
    """'1 CPU', '2 CPUs', '1.5 CPUs'."""
    return f"{n:g} {noun}{'' if n == 1 else 's'}"


def describe_worker(plan: RunPlan) -> str:
    return "GPU worker" if plan.use_gpu else "CPU worker"


def workers_text(plan: RunPlan) -> str:
    """'2 GPU workers', or for an elastic run '1-4 GPU workers (elastic)'."""
    if not plan.max_workers:
        return count(plan.num_workers, describe_worker(plan))
    return f"{plan.num_workers}-{plan.max_workers} {describe_worker(plan)}s (elastic)"


def this_machine() -> dict:
    """What local mode can use: this process's CPUs and the GPUs torch sees."""
    import torch

    return {"CPU": float(len(os.sched_getaffinity(0))), "GPU": torch.cuda.device_count()}


def plan_resources(cfg: TrainConfig, wait_for_resources: bool = False) -> RunPlan:
    """Decide use_gpu, num_workers and cpus_per_worker from what the cluster has; refuse what it can't hold."""
    if cfg.local_mode:
        resources, wait_for_resources = this_machine(), False
    else:
        import ray

        resources = ray.cluster_resources()
    cluster_cpus, cluster_gpus = resources.get("CPU", 0.0), int(resources.get("GPU", 0))
    where = "this machine" if cfg.local_mode else "the cluster"
    have = f"{where} has {count(cluster_cpus, 'CPU')} and {count(cluster_gpus, 'GPU')}"
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else (cfg.device != "cpu" and cluster_gpus > 0)
    if use_gpu and cfg.device == "cpu":
        raise LaunchError("use_gpu=True conflicts with device=cpu")
    num_workers = 1 if cfg.local_mode else cfg.num_workers or (max(cluster_gpus, 1) if use_gpu else 1)
    if not wait_for_resources and use_gpu and num_workers > cluster_gpus:
        raise LaunchError(
            f"{count(num_workers, 'GPU worker')} need{'s' if num_workers == 1 else ''} {count(num_workers, 'GPU')}"
            f" but {have}"
            " (pass --use_gpu=False to train on CPUs, or --wait-for-resources on an autoscaling cluster)"
        )
    cpus_per_worker = cfg.cpus_per_worker
    if not cpus_per_worker:
        # CPU workers share the node's cores; GPU workers need a few for data and kernel launches.
        share = cluster_cpus / num_workers if num_workers else 1
        cpus_per_worker = max(1.0, float(int(share))) if not use_gpu else max(1.0, min(4.0, float(int(share))))
    if not wait_for_resources and num_workers * cpus_per_worker > cluster_cpus:
        raise LaunchError(
            f"{count(num_workers, 'worker')} x {count(cpus_per_worker, 'CPU')} need "
            f"{count(num_workers * cpus_per_worker, 'CPU')} but {have} (lower --num-workers or --cpus_per_worker)"
        )
    if not use_gpu and cfg.dtype == "float16":
        raise LaunchError("dtype float16 needs a GPU; on CPU use --dtype=float32 (or bfloat16)")
    if not use_gpu and cfg.fp8:
        raise LaunchError("fp8=True trains on GPUs with FP8 tensor cores; this run has CPU workers: drop --fp8=True")
    check_workers(cfg, num_workers)
    run_name = cfg.run_name or Path(cfg.out_dir).name
    return RunPlan(num_workers, use_gpu, float(cpus_per_worker), run_name, max_workers=cfg.max_workers)


def check_workers(cfg: TrainConfig, num_workers: int) -> None:
    """What the worker count (the least, for an elastic run) must suit: the data order, the batch split."""
    if cfg.data_order == "nanogpt" and num_workers > 1:
        raise LaunchError(
            f"data_order=nanogpt replays one process's random stream; it needs num_workers=1, not {num_workers}"
        )
    if cfg.max_workers:
        check_elastic_range(cfg)
    else:
        check_divisible(cfg, num_workers)


def check_elastic_range(cfg: TrainConfig) -> None:
    """Every worker count an elastic run may have must split the global micro-batches evenly."""
    steps, counts = cfg.gradient_accumulation_steps, range(cfg.num_workers, cfg.max_workers + 1)
    bad = [n for n in counts if steps % n]
    if bad and not cfg.eval_only:
        good = [n for n in range(1, cfg.max_workers + 1) if steps % n == 0]
        raise LaunchError(
            f"--num-workers {cfg.num_workers}-{cfg.max_workers} includes {', '.join(map(str, bad))}, which "
            f"gradient_accumulation_steps ({steps}) cannot be divided by; the counts that divide it: "
            f"{', '.join(map(str, good))} (or change gradient_accumulation_steps)"
        )


def check_divisible(cfg: TrainConfig, num_workers: int) -> None:
    """gradient_accumulation_steps is global (nanoGPT's meaning under torchrun): each worker takes its share."""
    steps = cfg.gradient_accumulation_steps
    if steps % num_workers == 0 or cfg.eval_only:
        return
    lower, higher = steps - steps % num_workers, steps + num_workers - steps % num_workers
    nearest = " or ".join(f"--gradient_accumulation_steps={n}" for n in (lower, higher) if n > 0)
    raise LaunchError(
        f"gradient_accumulation_steps ({steps}) must be divisible by the number of workers ({num_workers}): "
        f"use {nearest}"
    )


def ray_checkpoint_dirs(cfg: TrainConfig, run_name: str) -> list[Path | str]:
    """Checkpoints of Ray run `run_name` in cfg.storage_path (oldest first), which a rerun resumes from:
    folders, or URIs when the storage is object storage."""
    if cfg.local_mode:
        return []  # local mode keeps no Ray checkpoints
    if is_uri(cfg.storage_path):
        run = join_uri(cfg.storage_path, run_name)
        return [join_uri(run, name) for name in list_folders(run, "checkpoint_")]
    storage = Path(storage_root(cfg.storage_path))
    return sorted(p for p in (storage / run_name).glob("checkpoint_*") if p.is_dir())


# Keys a rerun may change and still continue the same run; a change to any other is named when it resumes.
FREE_TO_CHANGE = {
    *(
        "num_workers",
        "max_workers",
        "elastic_resize_interval_s",
        "use_gpu",
        "cpus_per_worker",
        "parallelism",
        "fsdp_reshard_after_forward",
        "activation_checkpointing",
        "max_failures",
    ),
    *("max_preemption_failures", "max_iters", "lr_decay_iters", "warmup_iters", "min_lr", "decay_lr"),
    *("eval_interval", "log_interval", "eval_iters", "eval_only", "always_save_checkpoint", "async_checkpoint"),
    *("checkpoints_to_keep", "wandb_log", "wandb_project", "wandb_run_name"),
    *("compile", "compile_mode", "compile_regions", "ddp_split_graphs", "compile_eval", "compile_cache", "attention"),
    *("deterministic", "check_memory", "local_mode", "storage_path", "run_name", "out_dir", "data_dir"),
    *("init_from", "backend"),
}


def plan_resume(cfg: TrainConfig, run_name: str, explicit_keys, meta: dict | None) -> Path | None:
    """Decide, before Ray starts, whether this run continues an earlier one, and refuse the reruns that
    would silently train the wrong thing. Rerunning a command continues its run. Returns the checkpoint
    it continues from (Ray's latest of the run, else out_dir/ckpt.pt), or None for a new run."""
    ray_dirs = ray_checkpoint_dirs(cfg, run_name)
    out_ckpt = Path(cfg.out_dir) / checkpoint.CKPT_NAME
    where = f"run '{run_name}'"
    if ray_dirs:
        where = f"{where} (Ray checkpoints in {cfg.storage_path or '~/ray_results'})"
    elif out_ckpt.is_file() or out_ckpt.is_dir():
        where = f"{where} ({out_ckpt})"
    elif cfg.init_from == "resume":
        raise LaunchError(
            f"init_from=resume but there is no checkpoint: neither {out_ckpt} nor Ray run "
            f"'{run_name}' in {cfg.storage_path or '~/ray_results'}"
        )
    else:
        return None
    ways_out = (
        "rerun without the change to continue it, pass --run_name=NEW (or another --out_dir) for a new run, "
        "or --fresh to start a new run beside it (nothing is deleted)"
    )
    if cfg.init_from == "scratch" and "init_from" in explicit_keys:
        raise LaunchError(f"init_from=scratch, but {where} has checkpoints: {ways_out}")
    # The newest that reads, as the workers will choose (Ray's checkpoints newest first, then out_dir's).
    candidates = list(reversed(ray_dirs)) + ([] if ray_dirs else [out_ckpt])
    try:
        source, summary = checkpoint.newest_readable(candidates, warn=lambda text: print(text, flush=True))
    except checkpoint.CheckpointError as e:
        raise LaunchError(f"{e}; --fresh starts a new run beside it (nothing is deleted)") from None
    saved_args, saved_config = summary["model_args"], summary["config"]
    conflicts = [
        f"{key}={getattr(cfg, key)} (checkpoint: {saved_args[key]})"
        for key in checkpoint.ARCHITECTURE_KEYS
        if key in explicit_keys and key != "vocab_size" and getattr(cfg, key) != saved_args[key]
    ]
    if saved_config.get("dataset") not in (None, cfg.dataset):
        conflicts.append(f"dataset={cfg.dataset} (checkpoint: {saved_config['dataset']})")
    elif meta and meta.get("tokenizer") == "char" and meta["vocab_size"] != saved_args["vocab_size"]:
        conflicts.append(f"the dataset's vocab_size {meta['vocab_size']} (checkpoint: {saved_args['vocab_size']})")
    if conflicts:
        raise LaunchError(f"{where} was trained with another model or data: {', '.join(conflicts)}; {ways_out}")
    if summary["iter_num"] >= cfg.max_iters and not cfg.eval_only:
        raise LaunchError(
            f"{where} is already at iter {summary['iter_num']} (max_iters {cfg.max_iters}): pass a larger "
            "--max_iters (and --lr_decay_iters) to train further, --eval_only=True to evaluate it, or --fresh"
        )
    changed = [
        f"{key} {saved_config[key]!r} -> {getattr(cfg, key)!r}"
        for key in sorted(saved_config)
        if key in DEFAULTS and key not in FREE_TO_CHANGE and saved_config[key] != getattr(cfg, key)
    ]
    before = (saved_config.get("num_workers", cfg.num_workers), saved_config.get("max_workers", 0))
    if before != (cfg.num_workers, cfg.max_workers):  # 0 = one a GPU: the same spelling on both sides
        spell = lambda n, most: f"{n}-{most}" if most else str(n or "auto")  # noqa: E731
        changed.append(f"workers {spell(*before)} -> {spell(cfg.num_workers, cfg.max_workers)} (the same batches: "
                       "the global batch does not depend on the worker count)")  # fmt: skip
    print(
        f"raygpt: continuing {where} from iter {summary['iter_num']}"
        + (f"; changed since: {', '.join(changed)}" if changed else ""),
        flush=True,
    )
    return source


def fresh_out_dir(cfg: TrainConfig) -> TrainConfig:
    """--fresh: the first `<out_dir>-N` whose folder and Ray run are both unused; the old run is kept."""
    base = Path(cfg.out_dir)
    for n in range(2, 10_000):
        candidate = base.with_name(f"{base.name}-{n}")
        run_name = f"{cfg.run_name}-{n}" if cfg.run_name else candidate.name
        if not candidate.exists() and not ray_checkpoint_dirs(cfg, run_name):
            print(f"raygpt: --fresh: a new run '{run_name}' in {candidate}; {base} is kept as it was", flush=True)
            return cfg.replace(out_dir=str(candidate), run_name=cfg.run_name and run_name)
    raise LaunchError(f"--fresh found no free name beside {base}")


def is_prepared(dataset_dir: Path) -> bool:
    """All of a dataset's files are there (a failed preparation may have left a partial folder)."""
    has_meta = (dataset_dir / "meta.json").is_file() or (dataset_dir / "meta.pkl").is_file()
    return has_meta and all((dataset_dir / f"{split}.bin").is_file() for split in ("train", "val"))


def check_outputs(cfg: TrainConfig) -> list[Path]:
    """out_dir and a local storage_path exist (made here) and are writable folders. Returns the folders
    made, deepest first, to remove if the launch is refused. A storage_path URI must name a bucket that
    opens, a local one hold no file on its way (local mode keeps no Ray storage)."""
    if not cfg.local_mode:
        check_storage_path(cfg.storage_path)
    created: list[Path] = []
    try:
        for name in ("out_dir", "storage_path"):
            path = getattr(cfg, name)
            if path and "://" not in path:
                created += make_folder(name, Path(path))
    except LaunchError:
        remove_empty_folders(created)
        raise
    return created


def make_folder(name: str, path: Path) -> list[Path]:
    """mkdir -p `path` (the folder of config key `name`); returns the folders it made, deepest first."""
    missing = [p for p in (path, *path.parents) if not os.path.lexists(p)]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise LaunchError(f"{name} {path} is a file, not a folder: pass another --{name}") from None
    except OSError as e:
        remove_empty_folders([p for p in missing if p.is_dir()])
        raise LaunchError(f"cannot create {name} {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        remove_empty_folders(missing)
        raise LaunchError(f"{name} {path} is not writable: pass another --{name} or change its permissions")
    return missing


def check_wandb(cfg: TrainConfig) -> None:
    """wandb_log needs the package and, unless WandB runs offline, credentials: find out before Ray starts."""
    if not cfg.wandb_log:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise LaunchError("wandb_log=True needs the wandb package: pip install wandb") from None
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")):
        raise LaunchError(
            "wandb_log=True but WandB has no credentials: run `wandb login`, set WANDB_API_KEY, "
            "or set WANDB_MODE=offline"
        )


def check_bytecode() -> None:
    """A container trap: torch installed without compiled bytecode (`pip install --no-compile`) where
    Python may not write any (PYTHONDONTWRITEBYTECODE=1). Every worker process, and every one Ray
    restarts after a failure, then compiles torch's Python source again before it can train."""
    folders = packages_without_bytecode()
    if folders:
        names = ", ".join(Path(folder).name for folder in folders)
        print(f"raygpt: warning: {names} have no compiled bytecode (.pyc) here and Python writes none "
              "(PYTHONDONTWRITEBYTECODE, or read-only folders): each worker process, and each restart, "
              f"compiles them anew, seconds every time. Once: python -m compileall -q -j 0 {' '.join(folders)}",
              flush=True)  # fmt: skip


def check_data(cfg: TrainConfig, run_name: str, explicit_keys, prepare_input: str | None,
               new_runs: bool = False) -> tuple[Path | None, int]:  # fmt: skip
    """Data present (prepared here when the launcher knows how) and sane, and what to resume from;
    needs no cluster. Returns the resume checkpoint (or None) and the model's vocab_size. new_runs: the
    config is a sweep's base, whose trials are new runs of their own: a run under its names is neither
    continued nor in the way (unless init_from=resume asks every trial to start from it)."""
    remote = is_uri(cfg.data_dir)
    meta = remote_dataset_meta(cfg, prepare_input) if remote else local_dataset_meta(cfg, prepare_input)
    resumes = not new_runs or cfg.init_from == "resume"
    resume_from = plan_resume(cfg, run_name, explicit_keys, meta) if resumes else None
    if resume_from is not None:
        vocab_size = checkpoint.read_summary(resume_from)["model_args"]["vocab_size"]
    elif cfg.init_from.startswith("gpt2") or Path(cfg.init_from).is_dir():
        if cfg.init_from in HF_REPOS:  # found now, not by every worker after Ray has started
            try:
                check_gpt2_available(cfg.init_from)
            except RuntimeError as e:
                raise LaunchError(str(e)) from None
        vocab_size = GPT2_VOCAB_SIZE
    else:
        vocab_size = meta["vocab_size"] if meta else PADDED_GPT2_VOCAB_SIZE
    if not remote:  # a dataset at a URI is checked whole by each node once it has a copy (train.py)
        validate_dataset(Path(cfg.data_dir) / cfg.dataset, cfg.block_size, vocab_size)
    return resume_from, vocab_size


def local_dataset_meta(cfg: TrainConfig, prepare_input: str | None) -> dict | None:
    dataset_dir = Path(cfg.data_dir) / cfg.dataset
    if cfg.dataset in PREPARABLE and not is_prepared(dataset_dir):
        from raygpt.prep.dataset import prepare_dataset

        print(f"dataset {cfg.dataset} not found in {cfg.data_dir}: preparing it", flush=True)
        prepare_dataset(cfg.dataset, cfg.data_dir, input_path=prepare_input, input_flag="--prepare-input")
    try:
        return load_meta(dataset_dir) if dataset_dir.is_dir() else None
    except ValueError as e:
        raise LaunchError(str(e)) from None


def remote_dataset_meta(cfg: TrainConfig, prepare_input: str | None) -> dict:
    """A dataset in object storage: its meta.json read and its files' sizes checked, without downloading."""
    uri = dataset_uri(cfg.data_dir, cfg.dataset)
    try:
        remote = check_remote_dataset(uri)
    except DatasetNotFoundError:
        if cfg.dataset not in PREPARABLE:
            raise
        from raygpt.prep.dataset import prepare_dataset

        print(f"dataset {cfg.dataset} not found in {cfg.data_dir}: preparing it there", flush=True)
        prepare_dataset(cfg.dataset, cfg.data_dir, input_path=prepare_input, input_flag="--prepare-input")
        remote = check_remote_dataset(uri)
    train_tokens = remote["files"]["train.bin"]["bytes"] // 2
    if train_tokens < cfg.block_size + 1:
        raise LaunchError(f"{uri}/train.bin has {train_tokens} tokens, too few for block_size {cfg.block_size}")
    return vocabulary(remote)


def forward_worker_output(enabled: bool) -> None:
    """Whether this driver prints what its Ray workers print: Ray's own switch, which its debugger also
    turns off. A private flag: if it moves, workers' output is printed as before."""
    try:
        import ray._private.worker

        ray._private.worker._worker_logs_enabled = enabled
    except (ImportError, AttributeError):
        pass


def interruptible(trainer_class, hand_sigterm_to_workers: Callable[[], bool] | None = None):
    """The trainer class with raygpt's Ctrl-C handler in place of the one Ray Train's fit() installs.

    Ray's asks the controller to abort and then exits the process itself, so the launcher could say
    nothing about what was saved. This one asks the controller to abort, waits (ABORT_TIMEOUT_S at most)
    until the workers have stopped, so that no checkpoint is written after the launcher names the latest
    one, and then raises KeyboardInterrupt for the launcher's last line; a second Ctrl-C stops waiting.
    SIGTERM does the same, and raises Terminated, unless `hand_sigterm_to_workers` hands it to them:
    then they checkpoint and end the run, fit() returns, and the trainer's `stopped_by_sigterm` says why.
    Ray installs its handler only from the main thread (not under Tune), and so is this one."""

    class InterruptibleTrainer(trainer_class):
        def _register_sigint_handler(self, controller) -> None:
            import ray

            stopping = False

            def on_sigint(signum, frame):
                nonlocal stopping
                stop = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
                if stopping:
                    raise stop
                stopping = True
                if signum == signal.SIGTERM and hand_sigterm_to_workers is not None and hand_sigterm_to_workers():
                    self.stopped_by_sigterm = True
                    print("terminating: the workers save a checkpoint and end the run (SIGTERM again not to wait)",
                          file=sys.stderr, flush=True)  # fmt: skip
                    return
                print("interrupting: stopping the workers (Ctrl-C again not to wait)", file=sys.stderr, flush=True)
                try:
                    ray.get(controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    pass  # the controller is gone already, or too slow: exiting ends the run's actors too
                raise stop

            signal.signal(signal.SIGINT, on_sigint)
            signal.signal(signal.SIGTERM, on_sigint)

    return InterruptibleTrainer


ABORT_TIMEOUT_S = 30


def in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def build_trainer(cfg: TrainConfig, plan: RunPlan, callbacks=None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raygpt.worker.loop import train_loop_per_worker
    from raygpt.worker.process_group import FailureClock, NoTeardownTorchConfig

    # num_workers=0 is Ray Train's local mode: train_loop_per_worker runs in this process.
    workers = (plan.num_workers, plan.max_workers) if plan.max_workers else plan.num_workers  # (min, max): elastic
    scaling = ScalingConfig(
        num_workers=0 if cfg.local_mode else workers,
        use_gpu=plan.use_gpu,
        resources_per_worker={"CPU": plan.cpus_per_worker, **({"GPU": 1} if plan.use_gpu else {})},
        # A field of Ray's elastic ScalingConfig only (older Rays lack it): passed for elastic runs alone.
        **({"elastic_resize_monitor_interval_s": cfg.elastic_resize_interval_s} if plan.max_workers else {}),
    )
    run_config = RunConfig(
        name=plan.run_name,
        storage_path=cfg.storage_path or None,
        failure_config=FailureConfig(
            max_failures=cfg.max_failures, max_preemption_failures=cfg.max_preemption_failures
        ),
        checkpoint_config=CheckpointConfig(
            num_to_keep=cfg.checkpoints_to_keep, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
        ),
        callbacks=[*(callbacks or []), FailureClock(plan.launch_id)],
    )
    return interruptible(TorchTrainer, functools.partial(ask_workers_to_stop, plan.launch_id))(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "plan": dataclasses.asdict(plan)},
        torch_config=NoTeardownTorchConfig(backend=cfg.backend if plan.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=run_config,
    )


@dataclass(frozen=True)
class LauncherOptions:
    """The launcher's own options (not config keys): where Ray is, and how the launcher behaves."""

    address: str | None = None  # a Ray cluster to join; None: RAY_ADDRESS, a local `ray start` one, or a new one
    wait_for_resources: bool = False  # do not refuse what the cluster cannot hold now (autoscaling)
    prepare_input: str | None = None  # a local text file to prepare a missing shakespeare dataset from
    verbose: bool = False  # Ray's own log lines too


def prepare_run(
    cfg: TrainConfig, explicit_keys=(), options: LauncherOptions = LauncherOptions(), new_runs: bool = False
) -> tuple[TrainConfig, RunPlan]:
    """Everything before fit(). What needs no cluster comes first (paths, the run lock, data, resume,
    wandb), so a bad input costs no Ray start; then Ray, and the resources planned from what it has."""
    global _run_lock
    launched_at = time.time()
    cfg = absolute_paths(cfg)
    run_name = cfg.run_name or Path(cfg.out_dir).name
    if cfg.num_workers and not cfg.local_mode:  # a count given: checked now, not after Ray has started
        check_workers(cfg, cfg.num_workers)
    address, source = given_address(options.address)
    if address and not cfg.local_mode:  # also where this process is already connected (a notebook, tests)
        check_address(address, source)
    created = check_outputs(cfg)
    if _run_lock is not None:  # a second run from this process (tests, notebooks): the first one has ended
        _run_lock.release()
    try:
        _run_lock = lock_run(cfg.out_dir, cfg.storage_path, run_name)
        for leftover in checkpoint.remove_leftovers(cfg.out_dir):
            print(f"raygpt: removed {leftover.name}, left by a run killed while saving", flush=True)
        resume_from, vocab_size = check_data(cfg, run_name, explicit_keys, options.prepare_input, new_runs)
        check_wandb(cfg)
        check_bytecode()
        if not cfg.local_mode:
            connect(options.address, options.verbose)
        plan = plan_resources(cfg, options.wait_for_resources)
    except BaseException:  # a refusal (or Ctrl-C) leaves no lock file or empty folder behind
        if _run_lock is not None:
            _run_lock.discard()
            _run_lock = None
        remove_empty_folders(created)
        raise
    plan = dataclasses.replace(plan, launched_at=launched_at, ray_ready_at=time.time(), launch_id=uuid.uuid4().hex)
    if resume_from is not None and not ray_checkpoint_dirs(cfg, run_name):
        plan = dataclasses.replace(plan, resume_from=str(resume_from))
    return cfg, plan


# The lock of the run this process is launching: held until the process exits (or the next run).
_run_lock: RunLock | None = None


def run(cfg: TrainConfig, explicit_keys=(), options: LauncherOptions = LauncherOptions()):
    """Train `cfg` on Ray and return the ray.train.Result."""
    cfg, plan = prepare_run(cfg, explicit_keys, options)
    if cfg.local_mode:
        logging.getLogger("ray.train").setLevel(logging.WARNING)  # it logs every report at INFO
        print(
            f"raygpt: run '{plan.run_name}' in this process (Ray Train local mode) on "
            f"{'a GPU' if plan.use_gpu else count(plan.cpus_per_worker, 'CPU')}",
            flush=True,
        )
    else:
        print(
            f"raygpt: run '{plan.run_name}' with {workers_text(plan)}, {count(plan.cpus_per_worker, 'CPU')} each",
            flush=True,
        )
    forward_worker_output(True)
    # The trainer's handlers (interruptible) end with the run: a later run or a notebook gets its own back.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if in_main_thread() else {}
    # Local mode trains in this process: SIGTERM checkpoints at the next iteration boundary, then stops.
    restore_sigterm = handle_sigterm() if cfg.local_mode and in_main_thread() else lambda: None
    try:
        trainer = build_trainer(cfg, plan)
        result = trainer.fit()
        if getattr(trainer, "stopped_by_sigterm", False):  # the workers checkpointed and ended the run
            forward_worker_output(False)
            raise RunInterrupted(where_to_continue(cfg, plan), terminated=True)
    except KeyboardInterrupt as e:
        forward_worker_output(False)  # the workers' last lines would come after the launcher's last line
        raise RunInterrupted(where_to_continue(cfg, plan), terminated=isinstance(e, Terminated)) from None
    except (RaygptError, RunInterrupted):
        raise
    except Exception as e:  # noqa: BLE001 - one line for the user; Ray's log (or local mode's raise) keeps the rest
        from ray.train import TrainingFailedError

        if not (isinstance(e, TrainingFailedError) or cfg.local_mode):
            raise
        refusal = worker_refusal(e)
        if refusal is not None:  # bad input only a worker could see (its GPU's memory): a refusal all the same
            raise refusal from None
        forward_worker_output(False)
        raise RunFailed(f"training failed: {root_cause(e)}; {where_to_continue(cfg, plan)}") from e
    finally:
        restore_sigterm()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    summarize(result, cfg)
    return result


class RunFailed(Exception):
    """A run that started and failed; the message is one line (exit status 1, not a refusal's 2)."""


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM during a run; the message says where it can continue from."""

    def __init__(self, message: str, terminated: bool = False):
        super().__init__(message)
        self.terminated = terminated  # SIGTERM, not Ctrl-C


def where_to_continue(cfg: TrainConfig, plan: RunPlan) -> str:
    """What was saved and how to go on, for the last line of a failed or interrupted run."""
    ray_dirs = ray_checkpoint_dirs(cfg, plan.run_name)
    latest = ray_dirs[-1] if ray_dirs else Path(cfg.out_dir) / checkpoint.CKPT_NAME
    if not ray_dirs and not latest.exists():
        return "no checkpoint was saved yet"
    return f"the latest checkpoint is {latest}: run the same command again to continue from it"


def worker_refusal(error: BaseException) -> RaygptError | None:
    """The RaygptError a worker raised, if that is what failed the run."""
    for failure in (getattr(error, "worker_failures", None) or {}).values():
        cause = getattr(failure, "cause", None) or failure
        if isinstance(cause, RaygptError):
            return cause
    return None


def root_cause(error: BaseException) -> str:
    """One line for a failed fit(): the first worker's own exception, not Ray's wrapping of it."""
    failures = getattr(error, "worker_failures", None) or {}
    for failure in failures.values():
        cause = getattr(failure, "cause", None) or failure
        text = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {text[-1] if text else ''}"
    from ray.train import TrainingFailedError

    text = str(error).strip().splitlines()
    if not isinstance(error, TrainingFailedError):  # local mode raises the loop's own exception
        return f"{type(error).__name__}: {text[-1] if text else ''}"
    return text[-1] if text else type(error).__name__


def summarize(result, cfg: TrainConfig) -> None:
    if cfg.eval_only:  # rank 0 may run on another machine: its numbers come through Ray storage
        where = join_uri(storage_root(cfg.storage_path), cfg.run_name or Path(cfg.out_dir).name, EVAL_NAME)
        evaluated = json.loads(read_small_file(where))
        print(
            f"eval at iter {evaluated['iter']}: train loss {evaluated['train_loss']:.4f}, "
            f"val loss {evaluated['val_loss']:.4f} (written to {where}, and to out_dir on rank 0's machine)"
        )
        return
    if cfg.local_mode:  # no Ray storage: the checkpoint lives in out_dir only
        metrics = result.metrics or {}
        if "best_val_loss" in metrics:
            print(f"best val loss {metrics['best_val_loss']:.4f}: {Path(cfg.out_dir) / checkpoint.CKPT_NAME}")
        return
    best = result.best_checkpoints
    if best:
        ckpt, metrics = min(best, key=lambda pair: pair[1].get("val_loss", float("inf")))
        print(f"best val loss {metrics['val_loss']:.4f} at iter {metrics['iter']}: {ckpt.path}")
    if result.checkpoint is not None:
        print(f"latest checkpoint: {result.checkpoint.path}")
    print(f"run folder: {result.path}")


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


def parse_args(argv: list[str]):
    parser = OneLineParser(
        prog="python -m raygpt.launch",
        hint="--help lists the options and every config key",
        allow_abbrev=False,  # --f would be --fresh, --add=... --address: config keys are never abbreviated
        usage="%(prog)s [CONFIG_FILE] [--num-workers N] [--key=value ...] [launcher options]",
        add_help=False,
        description="Train a GPT with Ray Train. CONFIG_FILE is a nanoGPT-format config (key = value lines); "
        "any config key can also be given as --key=value. Rerunning a command continues its run.",
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help and every config key")
    add_launcher_options(parser)
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start a new run beside an earlier one of this out_dir (<out_dir>-2, ...); nothing is deleted",
    )
    parser.add_argument("--verbose", action="store_true", help="also show Ray's own log lines, with their prefixes")
    return parser, *parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        parser, args, config_argv = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # the parser printed its one line
        return EXIT_REFUSED if e.code else 0
    if args.help:
        print(parser.format_help())
        print(config_help())
        return 0
    try:
        cfg, explicit_keys = read_config(config_argv)
        if args.fresh:
            cfg = fresh_out_dir(absolute_paths(cfg))
        options = LauncherOptions(args.address, args.wait_for_resources, args.prepare_input, args.verbose)
        run(cfg, explicit_keys, options)
    except RaygptError as e:
        return refuse(e)
    except RunInterrupted as e:
        print(f"{'terminated' if e.terminated else 'interrupted'}: {e}", file=sys.stderr)
        return EXIT_TERMINATED if e.terminated else EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("interrupted before training started", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def program() -> None:
    """`python -m raygpt.launch` and `raygpt-launch`: main(), then a fast exit (see exit_without_teardown)."""
    code = main()
    from raygpt.processes import exit_without_teardown

    exit_without_teardown(code)


if __name__ == "__main__":
    program()
