"""`python -m raygpt.launch [CONFIG_FILE] [--num-workers N] [--key=value ...]`: config -> TorchTrainer.fit().

The only module that builds Ray configs. Everything that can be checked before a worker starts is
checked here (config, data, cluster resources, the checkpoint to resume), each failure one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from raygpt import checkpoint
from raygpt.config import ConfigError, TrainConfig, config_help, load_config, parse_config_file, parse_overrides
from raygpt.data import DataError, validate_dataset
from raygpt.errors import RaygptError
from raygpt.tokenizer import load_meta

PREPARABLE = ("shakespeare_char", "shakespeare")


class LaunchError(RaygptError, RuntimeError):
    """Something the launcher found wrong before training started; the message is one line."""


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Ray workers chdir into a session folder, so every path must be absolute in the driver."""

    def resolve(path: str) -> str:
        return path if "://" in path else str(Path(path).expanduser().resolve())

    changes = dict(out_dir=resolve(cfg.out_dir), data_dir=resolve(cfg.data_dir))
    if cfg.storage_path:
        changes["storage_path"] = resolve(cfg.storage_path)
    if not cfg.run_name:
        changes["run_name"] = Path(changes["out_dir"]).name
    return cfg.replace(**changes)


def quiet_ray() -> None:
    """Keep the console to raygpt's lines: no usage-stats notice, no duplicated worker prints
    (Train V2 copies print() into its own logger), no preemption-watcher noise on a local run."""
    for name, value in (
        ("RAY_USAGE_STATS_ENABLED", "0"),
        ("RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING", "0"),
        ("RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING", "0"),
        ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"),
        # The controller collects reports at this interval; a report waits for the
        # previous one to be collected, and fit() for the workers' end (default 2 s).
        ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
    ):
        os.environ.setdefault(name, value)


def connect(address: str | None) -> None:
    """Join the cluster at `address` / RAY_ADDRESS, or start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    quiet_ray()
    ray.init(address=address or os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING)
    start_autoscaling_coordinator()


def start_autoscaling_coordinator() -> None:
    """Start the actor Train V2's controller registers its resource request with, so that it is up by then.

    The controller creates it on first use and waits at most 5 s for it; a fresh process that must import
    ray.data takes about that long on a busy machine, and then each run starts with a warning and a
    traceback ("Failed to send resource request") after a 5 s stall (measured on a 16-core GPU machine).
    Creating it here, while the driver goes on preparing the run, is the same call with get_if_exists,
    so a cluster that already has one keeps it. A private Ray API: if it moves, Ray creates the actor as before."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        get_or_create_autoscaling_coordinator()
    except Exception:  # noqa: BLE001 - an optimization only
        pass


def this_machine() -> dict:
    """What local mode can use: this process's CPUs and the GPUs torch sees."""
    import torch

    return {"CPU": float(len(os.sched_getaffinity(0))), "GPU": torch.cuda.device_count()}


def plan_resources(cfg: TrainConfig, wait_for_resources: bool = False) -> TrainConfig:
    """Decide use_gpu, num_workers and cpus_per_worker from what the cluster has; refuse what it can't hold."""
    if cfg.local_mode:
        resources, wait_for_resources = this_machine(), False
    else:
        import ray

        resources = ray.cluster_resources()
    cluster_cpus, cluster_gpus = resources.get("CPU", 0.0), int(resources.get("GPU", 0))
    have = f"{'this machine' if cfg.local_mode else 'the cluster'} has {cluster_cpus:g} CPUs and {cluster_gpus} GPUs"
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else (cfg.device != "cpu" and cluster_gpus > 0)
    if use_gpu and cfg.device == "cpu":
        raise LaunchError("use_gpu=True conflicts with device=cpu")
    num_workers = 1 if cfg.local_mode else cfg.num_workers or (max(cluster_gpus, 1) if use_gpu else 1)
    if not wait_for_resources:
        if use_gpu and num_workers > cluster_gpus:
            raise LaunchError(
                f"{num_workers} GPU workers need {num_workers} GPUs but {have}"
                " (pass --use_gpu=False to train on CPUs, or --wait-for-resources on an autoscaling cluster)"
            )
    cpus_per_worker = cfg.cpus_per_worker
    if not cpus_per_worker:
        # CPU workers share the node's cores; GPU workers need a few for data and kernel launches.
        share = cluster_cpus / num_workers if num_workers else 1
        cpus_per_worker = max(1.0, float(int(share))) if not use_gpu else max(1.0, min(4.0, float(int(share))))
    if not wait_for_resources and num_workers * cpus_per_worker > cluster_cpus:
        raise LaunchError(
            f"{num_workers} workers x {cpus_per_worker:g} CPUs need {num_workers * cpus_per_worker:g}"
            f" CPUs but {have} (lower --num-workers or --cpus_per_worker)"
        )
    if not use_gpu and cfg.dtype == "float16":
        raise LaunchError("dtype float16 needs a GPU; on CPU use --dtype=float32 (or bfloat16)")
    if cfg.data_order == "nanogpt" and num_workers > 1:
        raise LaunchError(
            f"data_order=nanogpt replays one process's random stream; it needs num_workers=1, not {num_workers}"
        )
    if cfg.gradient_accumulation_steps % num_workers and not cfg.eval_only:
        raise LaunchError(
            f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be divisible by"
            f" the number of workers ({num_workers})"
        )
    return cfg.replace(use_gpu=use_gpu, num_workers=num_workers, cpus_per_worker=cpus_per_worker)


def ray_checkpoint_dirs(cfg: TrainConfig) -> list[Path]:
    """Checkpoints a rerun of this Ray run (same run_name and storage_path) would resume from."""
    storage = Path(cfg.storage_path or Path("~/ray_results").expanduser())
    if cfg.local_mode or "://" in str(cfg.storage_path):
        return []  # local mode keeps no Ray checkpoints; on cloud storage Ray itself finds them
    return sorted(p for p in (storage / cfg.run_name).glob("checkpoint_*") if p.is_dir())


def check_inputs(cfg: TrainConfig, prepare_input: str | None = None) -> None:
    """Data present and sane, output writable, resume source present: before any worker starts."""
    dataset_dir = Path(cfg.data_dir) / cfg.dataset
    if not dataset_dir.is_dir() and cfg.dataset in PREPARABLE:
        from raygpt.prepare import prepare_dataset

        print(f"dataset {cfg.dataset} not found in {cfg.data_dir}: preparing it", flush=True)
        prepare_dataset(cfg.dataset, cfg.data_dir, input_path=prepare_input)
    try:
        meta = load_meta(dataset_dir) if dataset_dir.is_dir() else None
    except ValueError as e:
        raise LaunchError(str(e)) from None
    resume_state = None
    if cfg.init_from == "resume" and not ray_checkpoint_dirs(cfg):
        ckpt_path = Path(cfg.out_dir) / checkpoint.CKPT_NAME
        if not ckpt_path.exists():
            raise LaunchError(
                f"init_from=resume but there is no checkpoint: neither {ckpt_path} nor Ray run "
                f"'{cfg.run_name}' in {cfg.storage_path or '~/ray_results'}"
            )
        resume_state = checkpoint.load(ckpt_path)
    if resume_state is not None:
        vocab_size = resume_state["model_args"]["vocab_size"]
    elif cfg.init_from.startswith("gpt2") or Path(cfg.init_from).is_dir():
        vocab_size = 50257
    else:
        vocab_size = meta["vocab_size"] if meta else 50304
    validate_dataset(dataset_dir, cfg.block_size, cfg.num_workers, vocab_size)
    for path in (cfg.out_dir, cfg.storage_path):
        if path and "://" not in path:
            try:
                Path(path).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise LaunchError(f"cannot create {path}: {e.strerror}") from None
            if not os.access(path, os.W_OK):
                raise LaunchError(f"{path} is not writable")


def build_trainer(cfg: TrainConfig, explicit_keys=(), callbacks=None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raygpt.train import train_loop_per_worker

    # num_workers=0 is Ray Train's local mode: train_loop_per_worker runs in this process.
    scaling = ScalingConfig(
        num_workers=0 if cfg.local_mode else cfg.num_workers,
        use_gpu=cfg.use_gpu,
        resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
    )
    run_config = RunConfig(
        name=cfg.run_name,
        storage_path=cfg.storage_path or None,
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=cfg.checkpoints_to_keep, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
        ),
        callbacks=callbacks,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "explicit_keys": sorted(explicit_keys)},
        torch_config=TorchConfig(backend=cfg.backend if cfg.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=run_config,
    )


def prepare_run(
    cfg: TrainConfig, address: str | None = None, wait_for_resources: bool = False, prepare_input: str | None = None
) -> TrainConfig:
    """Everything before fit(): absolute paths, a Ray connection, resources planned, inputs checked."""
    cfg = absolute_paths(cfg)
    if not cfg.local_mode:
        connect(address)
    cfg = plan_resources(cfg, wait_for_resources)
    check_inputs(cfg, prepare_input)
    return cfg


def run(
    cfg: TrainConfig,
    explicit_keys=(),
    address: str | None = None,
    wait_for_resources: bool = False,
    prepare_input: str | None = None,
):
    """Train `cfg` on Ray and return the ray.train.Result."""
    cfg = prepare_run(cfg, address, wait_for_resources, prepare_input)
    if cfg.local_mode:
        logging.getLogger("ray.train").setLevel(logging.WARNING)  # it logs every report at INFO
        print(
            f"raygpt: run '{cfg.run_name}' in this process (Ray Train local mode) on "
            f"{'a GPU' if cfg.use_gpu else f'{cfg.cpus_per_worker:g} CPUs'}",
            flush=True,
        )
    else:
        print(
            f"raygpt: run '{cfg.run_name}' with {cfg.num_workers} {'GPU' if cfg.use_gpu else 'CPU'} worker(s),"
            f" {cfg.cpus_per_worker:g} CPUs each",
            flush=True,
        )
    result = build_trainer(cfg, explicit_keys).fit()
    summarize(result, cfg)
    return result


def root_cause(error: BaseException) -> str:
    """One line for a failed fit(): the first worker's own exception, not Ray's wrapping of it."""
    failures = getattr(error, "worker_failures", None) or {}
    for failure in failures.values():
        cause = getattr(failure, "cause", None) or failure
        text = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {text[-1] if text else ''}"
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


def summarize(result, cfg: TrainConfig) -> None:
    if cfg.eval_only:
        evaluated = json.loads((Path(cfg.out_dir) / "eval.json").read_text())
        print(
            f"eval at iter {evaluated['iter']}: train loss {evaluated['train_loss']:.4f}, "
            f"val loss {evaluated['val_loss']:.4f} (written to {Path(cfg.out_dir) / 'eval.json'})"
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


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(
        prog="python -m raygpt.launch",
        add_help=False,
        description="Train a GPT with Ray Train. Any config key can be given as --key=value.",
    )
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local one)")
    parser.add_argument(
        "--wait-for-resources",
        action="store_true",
        help="do not refuse a run the cluster cannot hold now (autoscaling clusters)",
    )
    parser.add_argument(
        "--prepare-input",
        metavar="FILE",
        help="local text file to prepare a missing shakespeare dataset from (default: download)",
    )
    return parser.parse_known_args(argv)


def explicit_keys_of(config_argv: list[str]) -> set[str]:
    """Keys the user set in the config file or on the command line (vs. defaults)."""
    keys = set()
    if config_argv and not config_argv[0].startswith("-"):
        keys |= set(parse_config_file(config_argv[0]))
        config_argv = config_argv[1:]
    return keys | set(parse_overrides(config_argv))


def main(argv: list[str] | None = None) -> int:
    args, config_argv = parse_args(sys.argv[1:] if argv is None else argv)
    if args.help:
        print(__doc__.splitlines()[0].strip("`"))
        print("\nlauncher options: --address ADDR, --wait-for-resources, --prepare-input FILE\n")
        print(config_help())
        return 0
    try:
        cfg = load_config(config_argv)
        explicit_keys = explicit_keys_of(config_argv)
        run(cfg, explicit_keys, args.address, args.wait_for_resources, args.prepare_input)
    except (ConfigError, LaunchError, DataError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue from the latest checkpoint", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a failed fit() is reported as one line, the traceback is in Ray's log
        from ray.train import TrainingFailedError

        if not isinstance(e, TrainingFailedError):
            raise
        print(f"error: training failed: {root_cause(e)}", file=sys.stderr)
        return 1
    return 0


def program() -> None:
    """`python -m raygpt.launch` and `raygpt-launch`: main(), then a fast exit (see exit_without_teardown)."""
    code = main()
    from raygpt.speed import exit_without_teardown

    exit_without_teardown(code)


if __name__ == "__main__":
    program()
