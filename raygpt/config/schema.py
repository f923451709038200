"""TrainConfig: every key of nanoGPT's train.py plus what Ray needs, each with its default, its help and its
role; validation that reads nothing from disk; and the key lists other modules derive from the roles.

Config files (config/file.py) and `--key=value` (config/cli.py) both end in TrainConfig.from_dict.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raygpt.errors import RaygptError
from raygpt.storage.files import FileTooLargeError, NotARegularFileError, read_regular_file
from raygpt.storage.uri import is_uri


class ConfigError(RaygptError, ValueError):
    """A bad key, value or combination; the message is one line."""


# A key's role when a run is launched again on its checkpoints (driver's resume decision):
#   free:  may change without a word (where output goes, how many workers, how often to evaluate);
#   named: may change, and the "continuing" line names the change (the learning rate, the data);
#   model: the architecture; a change the user asks for is refused, the checkpoint's shape wins.
RERUN_ROLES = ("free", "named", "model")


def key(default, help: str, *, rerun: str, graph: bool = False, sweep: bool = True):
    """A config key: its default, its one-line description (--help and the README's table), its role on a
    rerun (RERUN_ROLES), whether it shapes the compiled graphs (so it is part of the compile cache's key),
    and whether Tune may sample it (sweep=False: every trial of a sweep shares it)."""
    assert rerun in RERUN_ROLES, rerun
    return field(default=default, metadata={"help": help, "rerun": rerun, "graph": graph, "sweep": sweep})


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = key("out", "folder for ckpt.pt (the newest checkpoint) and wandb files", rerun="free", sweep=False)
    eval_interval: int = key(2000, "evaluate (and maybe checkpoint) every this many iterations", rerun="free")
    log_interval: int = key(1, "print (and log to wandb) every this many iterations", rerun="free")
    eval_iters: int = key(200, "batches per split in each evaluation", rerun="free", graph=True)
    eval_only: bool = key(False, "evaluate once and exit", rerun="free", sweep=False)
    always_save_checkpoint: bool = key(True, "checkpoint at every eval, not only when val loss improves", rerun="free")
    async_checkpoint: bool = key(
        True, "write checkpoints in the background: training pauses only to copy them to host memory", rerun="free"
    )
    init_from: str = key(
        "scratch", "'scratch', 'resume' (out_dir/ckpt.pt), 'gpt2*', or a local HF GPT-2 folder", rerun="free"
    )
    # logging: wandb, TensorBoard
    wandb_log: bool = key(False, "log to Weights & Biases (rank 0 only)", rerun="free")
    wandb_project: str = key("owt", "wandb project", rerun="free")
    wandb_run_name: str = key("gpt2", "wandb run name", rerun="free")
    tensorboard: bool = key(True, "write TensorBoard event files to out_dir/tensorboard (rank 0 only)", rerun="free")
    # evals of each checkpoint (worker/validation.py): Ray tasks beside the training, or in the loop
    evals: str = key(
        "",
        "scored on each checkpoint, comma-separated: hellaswag, a .jsonl file in its format, bpb (bits per "
        "byte of val.bin); '' = none",
        rerun="free",
        sweep=False,
    )
    eval_examples: int = key(
        500,
        "examples of each multiple-choice eval (and windows of bpb) scored per checkpoint; 0 = all",
        rerun="free",
        sweep=False,
    )
    eval_cpus: float = key(1.0, "CPUs of the Ray task that scores a checkpoint", rerun="free", sweep=False)
    eval_gpus: float = key(
        0.0,
        "GPUs of the Ray task that scores a checkpoint (spare ones: the workers keep theirs)",
        rerun="free",
        sweep=False,
    )
    # data
    dataset: str = key("openwebtext", "dataset folder name under data_dir", rerun="named")
    gradient_accumulation_steps: int = key(
        40, "micro-steps per iteration over ALL workers (divided by their count)", rerun="named"
    )
    batch_size: int = key(12, "micro-batch size per worker", rerun="named", graph=True)
    block_size: int = key(1024, "context length in tokens", rerun="model")
    # model
    n_layer: int = key(12, "transformer blocks", rerun="model")
    n_head: int = key(12, "attention heads", rerun="model")
    n_embd: int = key(768, "embedding width", rerun="model")
    dropout: float = key(0.0, "dropout rate; 0 for pretraining, 0.1+ for finetuning", rerun="named")
    bias: bool = key(False, "biases in Linear and LayerNorm layers", rerun="model")
    # AdamW optimizer
    learning_rate: float = key(6e-4, "maximum learning rate", rerun="named")
    max_iters: int = key(600000, "total training iterations", rerun="free")
    weight_decay: float = key(1e-1, "AdamW weight decay on matrices and embeddings", rerun="named")
    beta1: float = key(0.9, "AdamW beta1", rerun="named")
    beta2: float = key(0.95, "AdamW beta2", rerun="named")
    grad_clip: float = key(1.0, "clip gradients at this norm; 0 disables", rerun="named")
    # learning rate decay
    decay_lr: bool = key(True, "warm up then cosine-decay the learning rate", rerun="free")
    warmup_iters: int = key(2000, "linear warmup iterations", rerun="free")
    lr_decay_iters: int = key(
        600000, "iteration where the cosine reaches min_lr (~max_iters per Chinchilla)", rerun="free"
    )
    min_lr: float = key(6e-5, "learning rate after decay (~learning_rate/10 per Chinchilla)", rerun="free")
    # system
    backend: str = key("nccl", "torch.distributed backend for GPU workers (CPU workers use gloo)", rerun="free")
    device: str = key(
        "cuda", "'cuda' uses the cluster's GPUs when it has some; 'cpu' forces CPU workers", rerun="named"
    )
    dtype: str = key(
        "auto",
        "'auto' (bfloat16 if supported, else float16 on CUDA, float32 on CPU), float32, bfloat16, float16",
        rerun="named",
        graph=True,
    )
    compile: bool = key(True, "torch.compile the model (PyTorch 2)", rerun="free")
    compile_mode: str = key(
        "default",
        "torch.compile mode: default, reduce-overhead (CUDA graphs; for small "
        "models), max-autotune, max-autotune-no-cudagraphs",
        rerun="free",
        graph=True,
    )
    compile_regions: bool = key(
        False,
        "compile each transformer block (one shared graph) instead of the whole "
        "model: compile time stops growing with n_layer; head and loss run eagerly",
        rerun="free",
        graph=True,
    )
    ddp_split_graphs: bool = key(
        False,
        "with DDP, split the compiled model at DDP's gradient buckets (torch's DDPOptimizer) so that the "
        "all-reduce overlaps the backward; False compiles one graph, whose compile AOTAutograd's cache keeps",
        rerun="free",
        graph=True,
    )
    compile_eval: bool = key(
        True,
        "also compile the eval forward; False evaluates eagerly, which skips a second compile and suits short runs",
        rerun="free",
        graph=True,
    )
    compile_cache: bool = key(
        True,
        "share compiled graphs through storage_path/compile-cache: restarts, reruns and trials reuse them",
        rerun="free",
    )
    attention: str = key(
        "auto",
        "scaled_dot_product_attention backend: auto (PyTorch picks), flash, cudnn, efficient, math",
        rerun="free",
    )
    deterministic: bool = key(
        False,
        "deterministic kernels (torch.use_deterministic_algorithms, cuBLAS workspace, math attention when "
        "attention=auto), so GPU reruns and restarts are bit-identical; slower (benchmarks/RESULTS.md)",
        rerun="free",
    )
    # parallelism
    parallelism: str = key(
        "ddp",
        "ddp: every worker holds the whole model (DistributedDataParallel); fsdp: weights, gradients and "
        "optimizer state sharded across the workers (FSDP2), with sharded checkpoints",
        rerun="free",
        graph=True,
    )
    fsdp_reshard_after_forward: bool = key(
        True,
        "fsdp: free each block's gathered weights after its forward and gather them again for its backward "
        "(least memory); False keeps them until the backward, one gather fewer a micro-step for a bf16 copy "
        "of the weights",
        rerun="free",
    )
    activation_checkpointing: str = key(
        "none",
        "recompute activations in the backward pass instead of keeping them: none, full (every block), "
        "selective (every other block)",
        rerun="free",
        graph=True,
    )
    fp8: bool = key(
        False,
        "FP8 matmuls in the transformer blocks' Linear layers (torchao float8 training, tensorwise scales; "
        "pip install raygpt[fp8]): CUDA GPUs of compute capability 8.9+ (H100, H200, L4) with bfloat16",
        rerun="named",
        graph=True,
    )
    # Ray
    data_dir: str = key("data", "folder holding <dataset>/train.bin, val.bin, meta.json", rerun="free", sweep=False)
    num_workers: int = key(
        0, "training workers; 0 = one per GPU in the cluster, or 1 on CPU", rerun="free", sweep=False
    )
    max_workers: int = key(
        0,
        "elastic: grow up to this many workers as the cluster allows, num_workers the least (--num-workers "
        "MIN-MAX sets both); 0 = a fixed count",
        rerun="free",
    )
    elastic_resize_interval_s: float = key(
        60.0,
        "elastic: seconds between Ray's checks for room to grow (growing restarts the workers from the latest "
        "checkpoint)",
        rerun="free",
    )
    use_gpu: bool | None = key(
        None, "None = use GPUs when the cluster has them; True requires them", rerun="free", sweep=False
    )
    cpus_per_worker: float = key(
        0.0, "CPUs reserved per worker; 0 = share the cluster's CPUs", rerun="free", sweep=False
    )
    storage_path: str = key(
        "", "Ray storage for checkpoints (a shared path or s3://...); '' = ~/ray_results", rerun="free", sweep=False
    )
    run_name: str = key(
        "",
        "Ray run name; '' = the one out_dir's run has, else out_dir's folder name: a rerun resumes it",
        rerun="free",
        sweep=False,
    )
    max_failures: int = key(0, "times Ray restarts the workers after a failure (-1 = always)", rerun="free")
    max_preemption_failures: int = key(
        -1,
        "times Ray restarts the run after a node is preempted, counted apart from max_failures (-1 = always)",
        rerun="free",
    )
    checkpoints_to_keep: int = key(
        2, "Ray checkpoints kept: the best by checkpoint_score (the latest is kept too)", rerun="free"
    )
    checkpoint_score: str = key(
        "val_loss",
        "what ranks checkpoints for checkpoints_to_keep: val_loss or an eval's metric (bpb, hellaswag/acc_norm, "
        "...); lowest loss and bpb, highest acc",
        rerun="free",
        sweep=False,
    )
    seed: int = key(1337, "seed for the initial weights, the batches and dropout", rerun="named")
    data_order: str = key(
        "seeded",
        "seeded: batches are a function of (seed, iteration, rank), so resumes are "
        "exact and evals do not depend on the worker count; nanogpt: one worker "
        "replays nanoGPT's train.py random stream, to compare number for number",
        rerun="named",
    )
    max_nonfinite_steps: int = key(10, "stop after this many consecutive non-finite steps (0 = never)", rerun="named")
    local_mode: bool = key(
        False,
        "run the loop in this process with Ray Train's local mode (one process, no "
        "cluster, no restarts): for debugging and small CPU machines",
        rerun="free",
    )
    check_memory: bool = key(
        True,
        "refuse, before building the model, a run whose estimated memory is over 1.5x the device's",
        rerun="free",
    )

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Types, choices, ranges and combinations. Reads nothing from disk: it runs wherever a TrainConfig
        is built (every worker, every Tune trial and search-space value). A local GPT-2 folder is checked
        by core/hf.py, before Ray starts and where its weights are read."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name), FIELD_TYPES[f.name]))
            check_usable(f.name, getattr(self, f.name))
        choose("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        choose("parallelism", self.parallelism, ("ddp", "fsdp"))
        choose("activation_checkpointing", self.activation_checkpointing, ("none", "full", "selective"))
        if self.parallelism == "fsdp" and self.dtype == "float16":
            raise ConfigError("dtype float16 is not supported with parallelism=fsdp; use bfloat16 (or float32)")
        if self.parallelism == "fsdp" and self.local_mode:
            raise ConfigError("parallelism=fsdp shards over Ray workers' process group; local_mode has none")
        check_fp8(self.fp8, self.device, self.dtype)
        choose("device", self.device, ("cuda", "cpu"))
        choose("backend", self.backend, ("nccl", "gloo"))
        choose("compile_mode", self.compile_mode, COMPILE_MODES)
        choose("attention", self.attention, ATTENTION_BACKENDS)
        choose("data_order", self.data_order, ("seeded", "nanogpt"))
        check_names(self)
        if not self.init_from.strip():  # '' would be the current folder
            raise unknown_init_from(self.init_from)
        check_ranges(self)
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.decay_lr and self.warmup_iters > self.lr_decay_iters:
            raise ConfigError(
                f"warmup_iters ({self.warmup_iters}) must not exceed lr_decay_iters ({self.lr_decay_iters})"
            )
        if self.decay_lr and self.min_lr > self.learning_rate:
            raise ConfigError(f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})")
        if self.max_workers and not 1 <= self.num_workers <= self.max_workers:
            raise ConfigError(
                f"an elastic run needs 1 <= num_workers <= max_workers, got {self.num_workers}-{self.max_workers}"
            )
        if self.local_mode and self.max_workers:
            raise ConfigError("local_mode runs one process; an elastic --num-workers range needs a Ray cluster")
        if self.local_mode and self.num_workers > 1:
            raise ConfigError(f"local_mode runs one process; num_workers={self.num_workers} needs a Ray cluster")
        if self.max_failures < -1:
            raise ConfigError(f"max_failures must be -1 (always) or more, got {self.max_failures}")
        if self.max_preemption_failures < -1:
            raise ConfigError(
                f"max_preemption_failures must be -1 (always) or more, got {self.max_preemption_failures}"
            )
        if self.checkpoints_to_keep < 1:
            raise ConfigError(f"checkpoints_to_keep must be at least 1, got {self.checkpoints_to_keep}")
        check_evals(self)
        if self.init_from in GPT2_MODELS and self.block_size > GPT2_CONTEXT:
            raise ConfigError(
                f"GPT-2 weights have a {GPT2_CONTEXT}-token context; block_size {self.block_size} is larger"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        for name in values:
            check_known(name)
        return cls(**values)

    def replace(self, **changes) -> TrainConfig:
        for name in changes:
            check_known(name)
        return dataclasses.replace(self, **changes)


# Seeds go to numpy.random.default_rng and torch.manual_seed; both take [0, 2**64), numpy's legacy
# RandomState [0, 2**32). The smaller range leaves room for seeds derived from it (seed + rank) everywhere.
SEED_LIMIT = 2**32
INT64_LIMIT = 2**63  # ints end up in numpy and torch int64s
MAX_STR_LEN = 4096  # a path's length limit on Linux (PATH_MAX); no name or path in a config is longer
NAME_MAX = 255  # bytes in one file or folder name: longer ones fail with ENAMETOOLONG (errno 36)
PATH_MAX = 4096  # bytes in a whole path, its closing NUL included
MAX_PATH_BYTES = PATH_MAX - 1 - NAME_MAX - 1  # a path raygpt writes into keeps room for one more name
MAX_SMALL_FILE_BYTES = 1 << 20  # a config file or a GPT-2 config.json is a few lines
CONTROL_CHARACTER = re.compile(r"[\x01-\x1f\x7f]")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
GPT2_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's GPT-2 sizes (core/hf.py: their HF repos)
GPT2_CONTEXT = 1024  # tokens, for every GPT-2 size
INIT_CHOICES = ("scratch", "resume", *GPT2_MODELS)  # any other init_from is a local GPT-2 folder
FIELD_TYPES = typing.get_type_hints(TrainConfig)
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
AT_LEAST_ONE = ("batch_size", "block_size", "n_layer", "n_head", "n_embd", "gradient_accumulation_steps",
                "eval_iters", "log_interval", "eval_interval")  # fmt: skip
NOT_NEGATIVE = ("max_iters", "warmup_iters", "lr_decay_iters", "num_workers", "max_workers", "max_nonfinite_steps",
                "weight_decay", "grad_clip", "min_lr", "cpus_per_worker", "elastic_resize_interval_s",
                "eval_examples", "eval_cpus", "eval_gpus")  # fmt: skip


def keys_where(**metadata) -> tuple[str, ...]:
    """The keys whose field metadata has these values (rerun=, graph=, sweep=), in TrainConfig's order."""
    return tuple(
        f.name for f in dataclasses.fields(TrainConfig) if all(f.metadata[k] == v for k, v in metadata.items())
    )


# Keys a rerun may change and still continue the same run; a change to any other is named when it resumes.
FREE_TO_CHANGE = frozenset(keys_where(rerun="free"))
# The model's shape: with vocab_size (from the data), what a checkpoint's model_args hold.
MODEL_KEYS = keys_where(rerun="model")
# Keys that change which graphs are compiled (the model's shape comes from model_args).
GRAPH_KEYS = keys_where(graph=True)
# Keys every trial of a sweep shares: paths and names are set per trial, resources are planned once.
NOT_SAMPLED = keys_where(sweep=False)


def check_known(name: str) -> None:
    if name not in DEFAULTS:
        close = difflib.get_close_matches(name, DEFAULTS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{name}'{hint}")


def is_plain_name(name: str) -> bool:
    """A name that is one folder under another: not empty, '.' or '..', and without a path separator."""
    return name not in ("", ".", "..") and "/" not in name and os.sep not in name


def check_names(cfg: TrainConfig) -> None:
    """Paths and names that would quietly mean something else: an empty out_dir or data_dir is the
    current folder, an empty dataset is data_dir itself, a run_name with a '/' or '..' puts Ray's run
    folder outside storage_path; and names too long for the OS to make (check_name_lengths)."""
    for name in ("out_dir", "data_dir"):
        if not getattr(cfg, name).strip():
            raise ConfigError(f"{name} must not be empty (use '.' for the current folder)")
    if not cfg.dataset.strip():
        raise ConfigError("dataset must not be empty: it names the dataset's folder under data_dir")
    if cfg.run_name.strip() and not is_plain_name(cfg.run_name.strip()):
        raise ConfigError(f"run_name must be a plain name, not a path, got {shown(cfg.run_name)}")
    for name in ("out_dir", "data_dir", "storage_path", "dataset", "run_name"):
        check_name_lengths(name, getattr(cfg, name))
    if cfg.init_from not in INIT_CHOICES:  # a local GPT-2 folder
        check_name_lengths("init_from", cfg.init_from)


def check_name_lengths(what: str, path: str) -> None:
    """Refuse a path the OS would refuse with ENAMETOOLONG: a folder or file name over NAME_MAX bytes, or a
    path over MAX_PATH_BYTES (room kept for the names raygpt puts inside it). Bytes, not characters: 'é' is
    two. A URI's parts are object keys, with no such limit, but a run or dataset name becomes a folder."""
    if path.lower().startswith("file://"):
        path = path[len("file://") :]
    elif is_uri(path):
        return
    check_part_lengths(what, path)
    size = len(os.fsencode(path))
    if size > MAX_PATH_BYTES:
        raise ConfigError(f"{what} is {size:,} bytes long, more than the {MAX_PATH_BYTES:,} that leave room for "
                          f"the files raygpt writes in it (the OS takes {PATH_MAX:,}): {shown(path)}")  # fmt: skip


def check_part_lengths(what: str, path: str) -> None:
    """Each folder or file name of `path` at most NAME_MAX bytes (Linux's, and most file systems' limit)."""
    for part in str(path).split("/"):
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            raise ConfigError(f"{what}: the name {shown(part)} is {size:,} bytes long, over the {NAME_MAX} a file "
                              "system allows in one name")  # fmt: skip


HELLASWAG = "hellaswag"  # HellaSwag's val split, fetched once by the launcher (prep/hellaswag.py) into:
HELLASWAG_CACHE, HELLASWAG_FILE = "~/.cache/raygpt/evals", "hellaswag_val.jsonl"
BPB = "bpb"  # bits per byte of the dataset's val.bin
EVAL_FILE_SUFFIX = ".jsonl"


def eval_tasks(evals: str) -> dict[str, str]:
    """The evals a value of `evals` names, name -> what it scores: HELLASWAG, BPB or a .jsonl path. A file's
    name (its metrics' prefix) is its stem: my_task.jsonl gives my_task/acc and my_task/acc_norm."""
    tasks: dict[str, str] = {}
    for item in (part.strip() for part in evals.split(",")):
        if not item:
            continue
        if item in (HELLASWAG, BPB):
            name = item
        elif item.endswith(EVAL_FILE_SUFFIX) and is_uri(item):
            raise ConfigError(f"evals: {item} is a URI; give a local copy (the launcher reads it and sends its "
                              "examples with each checkpoint's eval)")  # fmt: skip
        elif item.endswith(EVAL_FILE_SUFFIX):
            name = Path(item).name[: -len(EVAL_FILE_SUFFIX)]
        else:
            close = difflib.get_close_matches(item, (HELLASWAG, BPB), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"evals: unknown eval {shown(item)}{hint}: give hellaswag, bpb or a .jsonl file "
                              "in HellaSwag's format")  # fmt: skip
        if name in tasks:
            raise ConfigError(f"evals names '{name}' twice: each eval's metrics are named after it")
        tasks[name] = item
    return tasks


def eval_metrics(tasks: dict[str, str]) -> list[str]:
    """The metrics the evals report for each checkpoint: <name>/acc and <name>/acc_norm, and bpb."""
    return [metric for name in tasks for metric in ([BPB] if name == BPB else [f"{name}/acc", f"{name}/acc_norm"])]


def score_order(metric: str) -> str:
    """How checkpoint_score ranks: a loss or bpb the lower the better, an accuracy the higher."""
    return "max" if metric.rsplit("/", 1)[-1] in ("acc", "acc_norm") else "min"


def check_evals(cfg: TrainConfig) -> None:
    """evals names known evals, and checkpoint_score a metric the run reports for its checkpoints."""
    metrics = eval_metrics(eval_tasks(cfg.evals))
    if metrics and cfg.eval_only:
        raise ConfigError("evals score each checkpoint, and eval_only saves none: score a checkpoint with "
                          "python -m raygpt.eval")  # fmt: skip
    if cfg.checkpoint_score != "val_loss" and cfg.checkpoint_score not in metrics:
        offered = ", ".join(["val_loss", *metrics])
        advice = "" if cfg.evals else ": set evals to rank by an eval's"
        raise ConfigError(f"checkpoint_score must be a metric of the run's checkpoints ({offered}), got "
                          f"{shown(cfg.checkpoint_score)}{advice}")  # fmt: skip


def check_fp8(fp8: bool, device: str, dtype: str) -> None:
    """What a config alone says against fp8=True: FP8 matmuls run on CUDA GPUs, and the rest of the model
    in bfloat16. (The launcher refuses a cluster without GPUs; core/fp8.py the GPU and the resolved dtype.)"""
    if fp8 and device == "cpu":
        raise ConfigError("fp8=True trains on CUDA GPUs with FP8 tensor cores; device is cpu: drop --fp8=True")
    if fp8 and dtype in ("float32", "float16"):
        raise ConfigError(f"fp8=True computes the rest of the model in bfloat16; dtype {dtype}: use bfloat16")


def check_ranges(cfg: TrainConfig) -> None:
    """Each number in the range its key can mean something in."""
    for name in AT_LEAST_ONE:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    for name in NOT_NEGATIVE:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must not be negative, got {getattr(cfg, name)}")
    for name in ("dropout", "beta1", "beta2"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {getattr(cfg, name)}")
    if not 0 <= cfg.seed < SEED_LIMIT:
        raise ConfigError(f"seed must be in [0, 2**32), got {shown(cfg.seed)}")
    if cfg.learning_rate <= 0:
        raise ConfigError(f"learning_rate must be positive, got {cfg.learning_rate}")


def unknown_init_from(init_from: str) -> ConfigError:
    """The refusal of an init_from that is none of INIT_CHOICES and no folder."""
    return ConfigError(
        f"init_from must be one of {', '.join(INIT_CHOICES)} or a local GPT-2 folder, got {shown(init_from)}"
    )


def choose(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {shown(value)}")


def shorten(text: str, limit: int = 80) -> str:
    """`text` on one line, cut to about `limit` characters: an error message stays one readable line."""
    text = " ".join(text.split())
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text):,} characters)"


def shown(value: Any) -> str:
    return shorten(repr(value))


def check_usable(name: str, value: Any) -> None:
    """What a value of each type must be whatever its key means: an int fits int64, a float is finite,
    a string is a name or a path (no NUL, at most PATH_MAX characters)."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int) and not -INT64_LIMIT <= value < INT64_LIMIT:
        raise ConfigError(f"{name} must fit in 64 bits (less than 2**63 in size), got {shown(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    if isinstance(value, str) and "\0" in value:
        raise ConfigError(f"{name} must not contain a NUL character, got {shown(value)}")
    if isinstance(value, str) and CONTROL_CHARACTER.search(value):
        # A newline or escape in a name or path would break the one-line messages and the console.
        raise ConfigError(f"{name} must not contain control characters (newline, tab, escape), got {shown(value)}")
    if isinstance(value, str):
        try:
            os.fsencode(value)  # a lone surrogate ('\ud800') has no bytes a path or a log could hold
        except UnicodeEncodeError:
            raise ConfigError(f"{name} is not valid text (a lone surrogate), got {shown(value)}") from None
    if isinstance(value, str) and len(value) > MAX_STR_LEN:
        raise ConfigError(f"{name} is {len(value):,} characters long; at most {MAX_STR_LEN:,}")


def read_small_file(path: Path, what: str) -> bytes:
    """The bytes of a small regular file (storage.files' reader); missing, a folder, a symlink loop, a
    device or too big: one line naming `what`."""
    try:
        return read_regular_file(path, MAX_SMALL_FILE_BYTES)
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder") from None
    except NotARegularFileError:
        raise ConfigError(f"{what} {path} is not a regular file") from None
    except FileTooLargeError:
        raise ConfigError(f"{what} {path} is larger than {MAX_SMALL_FILE_BYTES >> 20} MiB: not a {what}") from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None


def coerce(name: str, value: Any, typ) -> Any:
    """Check `value` against the field's type; an int is fine for a float, strings spell bools/None."""
    optional = typing.get_origin(typ) in (typing.Union, types.UnionType) and type(None) in typing.get_args(typ)
    if optional:
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
        if value is None or (isinstance(value, str) and value.lower() in ("none", "auto")):
            return None
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    kind = {bool: "a bool", int: "an int", float: "a float", str: "a string"}[typ]
    raise ConfigError(f"config key '{name}' must be {kind}{' or None' if optional else ''}, got {shown(value)}")
