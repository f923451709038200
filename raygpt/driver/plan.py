"""The run plan: what the launcher decided for a run (workers, resources, its name, where it resumes),
handed to every worker as a dict and rebuilt there as a RunPlan; how the resources and the worker count
are planned from what the cluster has; and the resume decision (which checkpoint a rerun continues from,
and the reruns refused because they would silently train something else)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from raygpt.config.schema import DEFAULTS, FREE_TO_CHANGE, MODEL_KEYS, TrainConfig
from raygpt.core import checkpoint
from raygpt.core.data import vocabulary_change
from raygpt.errors import LaunchError
from raygpt.storage.uri import is_uri, join_uri, list_folders, storage_root


@dataclass(frozen=True)
class RunPlan:
    """What the launcher decided for a run, kept apart from what the user asked (the TrainConfig)."""

    num_workers: int  # the least, for an elastic run
    use_gpu: bool
    cpus_per_worker: float
    run_name: str
    resume_from: str | None = None  # out_dir/ckpt.pt to continue from when Ray holds no checkpoint of the run
    # time.time() when the launcher started and when Ray was ready: the start-up line the loop prints
    launched_at: float = 0.0
    ray_ready_at: float = 0.0
    max_workers: int = 0  # an elastic run grows up to this many; 0: a fixed count
    launch_id: str = ""  # new at each launch: a worker group tells Ray's restart of it from its first start


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


def cpu_share(cpus: float, workers: int, use_gpu: bool) -> float:
    """CPUs for each of `workers` sharing `cpus`: CPU workers share the node's cores; GPU workers need a
    few (at most 4) for data and kernel launches."""
    share = int(cpus / workers) if workers else 1
    return float(max(1, min(4, share)) if use_gpu else max(1, share))


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
    eval_cpus, eval_gpus = eval_task(cfg)
    spare_gpus = max(cluster_gpus - math.ceil(eval_gpus), 1)
    num_workers = 1 if cfg.local_mode else cfg.num_workers or (spare_gpus if use_gpu else 1)
    if not wait_for_resources and use_gpu and num_workers > cluster_gpus:
        raise LaunchError(
            f"{count(num_workers, 'GPU worker')} need{'s' if num_workers == 1 else ''} {count(num_workers, 'GPU')}"
            f" but {have} (pass --use_gpu=False to train on CPUs"
            + (")" if cfg.local_mode else ", or --wait-for-resources on an autoscaling cluster)")
        )
    cpus_per_worker = cfg.cpus_per_worker or cpu_share(cluster_cpus - eval_cpus, num_workers, use_gpu)
    if not wait_for_resources and num_workers * cpus_per_worker > cluster_cpus:
        raise LaunchError(
            f"{count(num_workers, 'worker')} x {count(cpus_per_worker, 'CPU')} need "
            f"{count(num_workers * cpus_per_worker, 'CPU')} but {have} (lower "
            + ("--cpus_per_worker)" if cfg.local_mode else "--num-workers or --cpus_per_worker)")
        )
    free_cpus, free_gpus = cluster_cpus - num_workers * cpus_per_worker, cluster_gpus - num_workers * use_gpu
    if not wait_for_resources and (eval_cpus > free_cpus or eval_gpus > free_gpus):
        raise LaunchError(
            f"the evals' Ray task needs {count(eval_cpus, 'CPU')} and {count(eval_gpus, 'GPU')} beside the "
            f"workers, but {have} and the workers take {count(num_workers * cpus_per_worker, 'CPU')} and "
            f"{count(num_workers * use_gpu, 'GPU')} (lower --eval_cpus or --eval_gpus, --num-workers or "
            "--cpus_per_worker)"
        )
    if not use_gpu and cfg.dtype == "float16":
        raise LaunchError("dtype float16 needs a GPU; on CPU use --dtype=float32 (or bfloat16)")
    if not use_gpu and cfg.fp8:
        raise LaunchError("fp8=True trains on GPUs with FP8 tensor cores; this run has CPU workers: drop --fp8=True")
    check_workers(cfg, num_workers)
    run_name = cfg.run_name or Path(cfg.out_dir).name  # preflight has set it (identity.identify_run)
    return RunPlan(num_workers, use_gpu, float(cpus_per_worker), run_name, max_workers=cfg.max_workers)


def eval_task(cfg: TrainConfig) -> tuple[float, float]:
    """The CPUs and GPUs of the Ray task that scores each checkpoint (worker/validation.py), which the
    workers leave free; none without evals, or in local mode (they run in the loop)."""
    return (cfg.eval_cpus, cfg.eval_gpus) if cfg.evals.strip() and not cfg.local_mode else (0.0, 0.0)


def check_workers(cfg: TrainConfig, num_workers: int, advice: str | None = None) -> None:
    """What the worker count (the least, for an elastic run) must suit: the data order, the batch split.
    `advice`: what to do about an indivisible batch split (check_divisible)."""
    if cfg.data_order == "nanogpt" and num_workers > 1:
        raise LaunchError(
            f"data_order=nanogpt replays one process's random stream; it needs num_workers=1, not {num_workers}"
        )
    if cfg.max_workers:
        check_elastic_range(cfg)
    else:
        check_divisible(cfg, num_workers, advice)


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


def check_divisible(cfg: TrainConfig, num_workers: int, advice: str | None = None) -> None:
    """gradient_accumulation_steps is global (nanoGPT's meaning under torchrun): each worker takes its share.
    A sweep (raygpt.tune) checks each value it may sample, with `advice` of its own; a launch is told the
    nearest values that divide."""
    steps = cfg.gradient_accumulation_steps
    if steps % num_workers == 0 or cfg.eval_only:
        return
    if advice is None:
        advice = "use " + " or ".join(
            f"--gradient_accumulation_steps={n}" for n in nearest_multiples(steps, num_workers)
        )
    raise LaunchError(
        f"gradient_accumulation_steps ({steps}) must be divisible by the number of workers ({num_workers}): {advice}"
    )


def nearest_multiples(steps: int, num_workers: int) -> list[int]:
    """The multiples of num_workers just below and above `steps` (the one below only if positive)."""
    lower, higher = steps - steps % num_workers, steps + num_workers - steps % num_workers
    return [n for n in (lower, higher) if n > 0]


def ray_checkpoint_dirs(cfg: TrainConfig, run_name: str) -> list[Path | str]:
    """Checkpoints of Ray run `run_name` in cfg.storage_path (oldest first) that this launch's Ray run
    writes beside: none in local mode, which keeps no Ray storage."""
    return [] if cfg.local_mode else ray_run_checkpoints(cfg, run_name)


def ray_run_checkpoints(cfg: TrainConfig, run_name: str) -> list[Path | str]:
    """Checkpoints of Ray run `run_name` in cfg.storage_path (oldest first): folders, or URIs when the
    storage is object storage."""
    if is_uri(cfg.storage_path):
        run = join_uri(cfg.storage_path, run_name)
        return [join_uri(run, name) for name in list_folders(run, "checkpoint_")]
    storage = Path(storage_root(cfg.storage_path))
    return sorted(p for p in (storage / run_name).glob("checkpoint_*") if p.is_dir())


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a rerun continues from, as the launcher chose it."""

    source: Path | str  # one of the Ray run's checkpoints (a folder or a URI), or out_dir/ckpt.pt
    summary: dict  # its model_args, iter_num and config (checkpoint.read_summary)
    in_ray_run: bool  # Ray hands the run's checkpoints to the workers; else the plan names it (resume_from)


def written_after_ray(out_ckpt: Path, ray_dirs: list) -> bool:
    """Whether out_dir/ckpt.pt counts beside the run's Ray checkpoints: only one written after Ray's latest
    (by a local-mode run, say) can hold a later iteration. One written before it is the copy a Ray worker
    keeps on its own node, which on a cluster this machine may not even see: it is not read."""
    if not ray_dirs or not isinstance(ray_dirs[-1], Path):  # in object storage: compared by iteration
        return True
    try:
        return out_ckpt.stat().st_mtime > ray_dirs[-1].stat().st_mtime
    except OSError:
        return True


def plan_resume(cfg: TrainConfig, run_name: str, explicit_keys, meta: dict | None, new_runs: bool = False,
                ray_run_is_ours: bool | None = None, dataset: dict | None = None) -> ResumePoint | None:  # fmt: skip
    """Decide, before Ray starts, whether this run continues an earlier one, and refuse the reruns that
    would silently train the wrong thing; a run already at max_iters raises NothingToDo. Rerunning a
    command continues its run. Returns the checkpoint it continues from (of the run's Ray checkpoints and
    out_dir/ckpt.pt, the readable one at the latest iteration: checkpoint.newest_readable), or None for a
    new run. `meta`: the dataset's (None: none found). new_runs: the config is a sweep's base, whose
    trials are new runs of their own: a run under its names is neither continued nor in the way (unless
    init_from=resume asks every trial to start from it). ray_run_is_ours: whether Ray run `run_name`'s
    checkpoints are this run's (identify_run; None: in Ray mode). `dataset`: the dataset's identity
    (core.data.dataset_identity), compared with the one the checkpoint records."""
    if new_runs and cfg.init_from != "resume":
        return None
    ours = not cfg.local_mode if ray_run_is_ours is None else ray_run_is_ours
    ray_dirs = ray_run_checkpoints(cfg, run_name) if ours else []
    out_ckpt = Path(cfg.out_dir) / checkpoint.CKPT_NAME
    has_out_ckpt = (out_ckpt.is_file() or out_ckpt.is_dir()) and written_after_ray(out_ckpt, ray_dirs)
    where = f"run '{run_name}'"
    if ray_dirs:
        where = f"{where} (Ray checkpoints in {cfg.storage_path or '~/ray_results'})"
    elif has_out_ckpt:
        where = f"{where} ({out_ckpt})"
    elif cfg.init_from == "resume":
        raise LaunchError(
            f"init_from=resume but there is no checkpoint: neither {out_ckpt} nor Ray run "
            f"'{run_name}' in {cfg.storage_path or '~/ray_results'}"
        )
    else:
        return None
    source, summary = None, None
    if not starts_from_scratch(cfg, explicit_keys):  # else refused below, no checkpoint read
        latest, older = (ray_dirs[-1], ray_dirs[-2::-1]) if ray_dirs else (None, None)
        candidates = checkpoint.resume_candidates(latest, older, fallback=out_ckpt if has_out_ckpt else None)
        try:
            source, summary = checkpoint.newest_readable(candidates, warn=lambda text: print(text, flush=True))
        except checkpoint.CheckpointError as e:
            raise LaunchError(f"{e}; --fresh starts a new run beside it (nothing is deleted)") from None
    refusal = resume_refusal(cfg, explicit_keys, where, summary, meta, dataset)
    if refusal:
        raise LaunchError(refusal)
    finished = already_finished(cfg, where, summary)
    if finished:
        raise NothingToDo(finished)
    changed = changed_since(cfg, summary["config"]) + dataset_changes(cfg, summary, dataset)
    print(
        f"raygpt: continuing {where} from iter {summary['iter_num']}"
        + (
            f" ({source}, the latest iteration of the run's checkpoints)"
            if ray_dirs and (cfg.local_mode or source != ray_dirs[-1])
            else ""
        )
        + (f"; changed since: {', '.join(changed)}" if changed else ""),
        flush=True,
    )
    return ResumePoint(source, summary, in_ray_run=not cfg.local_mode and bool(ray_dirs) and source == ray_dirs[-1])


def starts_from_scratch(cfg: TrainConfig, explicit_keys) -> bool:
    """init_from=scratch said on the command line (or in the config file): a new run was asked for."""
    return cfg.init_from == "scratch" and "init_from" in explicit_keys


WAYS_OUT = (
    "rerun without the change to continue it, pass another --out_dir for a new run, "
    "or --fresh to start a new run beside it (nothing is deleted)"
)


def resume_refusal(cfg: TrainConfig, explicit_keys, where: str, summary: dict | None, meta: dict | None,
                   dataset: dict | None = None) -> str | None:  # fmt: skip
    """Why a rerun must not continue the checkpoint `summary` (read_summary's) of the run at `where`, or
    None: a new run asked for explicitly, another model or dataset (or, for a character-level dataset,
    another vocabulary; or token ids that mean other tokens than the checkpoint's dataset's). `meta`:
    the dataset's meta (None: none found); `dataset`: its identity (core.data.dataset_identity), compared
    with the one the checkpoint records (older ones record none). `summary` None: the checkpoint was not
    read (a new run was asked for, which is refused first)."""
    if starts_from_scratch(cfg, explicit_keys):
        return f"init_from=scratch, but {where} has checkpoints: {WAYS_OUT}"
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
    elif vocabulary_change(summary.get("dataset"), dataset):
        conflicts.append(vocabulary_change(summary["dataset"], dataset))
    if conflicts:
        return f"{where} was trained with another model or data: {', '.join(conflicts)}; {WAYS_OUT}"
    return None


class NothingToDo(LaunchError):
    """A rerun of a run already at max_iters: nothing to train, which is no error (raygpt.launch exits 0
    with the line; a sweep, whose trials would all train nothing, refuses it as any LaunchError)."""


def already_finished(cfg: TrainConfig, where: str, summary: dict) -> str | None:
    """What a rerun of a finished run (its checkpoint `summary` at max_iters) says, or None: more to train,
    or an eval_only run, which evaluates it."""
    if summary["iter_num"] < cfg.max_iters or cfg.eval_only:
        return None
    return (
        f"{where} is already at iter {summary['iter_num']} (max_iters {cfg.max_iters}): nothing to do; pass a "
        "larger --max_iters (and --lr_decay_iters) to train further, --eval_only=True to evaluate it, or --fresh"
    )


def dataset_changes(cfg: TrainConfig, summary: dict, current: dict | None) -> list[str]:
    """For the 'continuing' line: a data_dir other than the checkpoint's, and token files that grew or
    changed since it was written (the same vocabulary: a resume may go on with more data)."""
    changes = []
    saved_dir = summary["config"].get("data_dir")
    if saved_dir is not None and saved_dir != cfg.data_dir:
        changes.append(f"data_dir {saved_dir!r} -> {cfg.data_dir!r}")
    saved_files = (summary.get("dataset") or {}).get("files") or {}
    for name, now in ((current or {}).get("files") or {}).items():
        before = saved_files.get(name)
        if before is None or before == now:
            continue
        tokens = f"{before['bytes'] // 2:,} -> {now['bytes'] // 2:,} tokens" if before["bytes"] != now["bytes"] else ""
        changes.append(f"{cfg.dataset}/{name} {tokens or 'prepared again (as many tokens)'}, the same vocabulary")
    return changes


def changed_since(cfg: TrainConfig, saved_config: dict) -> list[str]:
    """The keys outside FREE_TO_CHANGE a rerun changed, and the worker count, for the 'continuing' line.
    Never the model's keys: the checkpoint's shape is kept (a change asked for is refused before)."""
    changed = [
        f"{key} {saved_config[key]!r} -> {getattr(cfg, key)!r}"
        for key in sorted(saved_config)
        if key in DEFAULTS
        and key not in FREE_TO_CHANGE
        and key not in MODEL_KEYS
        and saved_config[key] != getattr(cfg, key)
    ]
    before = (saved_config.get("num_workers", cfg.num_workers), saved_config.get("max_workers", 0))
    if before != (cfg.num_workers, cfg.max_workers):  # 0 = one a GPU: the same spelling on both sides
        changed.append(f"workers {spelled_workers(*before)} -> {spelled_workers(cfg.num_workers, cfg.max_workers)} "
                       "(the same batches: the global batch does not depend on the worker count)")  # fmt: skip
    return changed


def spelled_workers(n: int, most: int) -> str:
    """A worker count as the command line gives it: '2', '1-4' (elastic), 'auto' (0: one a GPU)."""
    return f"{n}-{most}" if most else str(n or "auto")
