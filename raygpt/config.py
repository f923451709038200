"""TrainConfig: every key of nanoGPT's train.py plus what Ray needs; config files and --key=value parsing.

Config files keep nanoGPT's format (`key = value` lines, comments, literals, simple arithmetic) and
nanoGPT's own files load unchanged, but they are read with `ast`, never exec'd: a config file cannot
run code.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import operator
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raygpt.errors import RaygptError


class ConfigError(RaygptError, ValueError):
    """A bad key, value or combination; the message is one line."""


def key(default, help: str):
    """A config field with its one-line description (shown by --help)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = key("out", "folder for ckpt.pt (the newest checkpoint) and wandb files")
    eval_interval: int = key(2000, "evaluate (and maybe checkpoint) every this many iterations")
    log_interval: int = key(1, "print (and log to wandb) every this many iterations")
    eval_iters: int = key(200, "batches per split in each evaluation")
    eval_only: bool = key(False, "evaluate once and exit")
    always_save_checkpoint: bool = key(True, "checkpoint at every eval, not only when val loss improves")
    init_from: str = key("scratch", "'scratch', 'resume' (out_dir/ckpt.pt), 'gpt2*', or a local HF GPT-2 folder")
    # wandb logging
    wandb_log: bool = key(False, "log to Weights & Biases (rank 0 only)")
    wandb_project: str = key("owt", "wandb project")
    wandb_run_name: str = key("gpt2", "wandb run name")
    # data
    dataset: str = key("openwebtext", "dataset folder name under data_dir")
    gradient_accumulation_steps: int = key(40, "micro-steps per iteration over ALL workers (divided by their count)")
    batch_size: int = key(12, "micro-batch size per worker")
    block_size: int = key(1024, "context length in tokens")
    # model
    n_layer: int = key(12, "transformer blocks")
    n_head: int = key(12, "attention heads")
    n_embd: int = key(768, "embedding width")
    dropout: float = key(0.0, "dropout rate; 0 for pretraining, 0.1+ for finetuning")
    bias: bool = key(False, "biases in Linear and LayerNorm layers")
    # AdamW optimizer
    learning_rate: float = key(6e-4, "maximum learning rate")
    max_iters: int = key(600000, "total training iterations")
    weight_decay: float = key(1e-1, "AdamW weight decay on matrices and embeddings")
    beta1: float = key(0.9, "AdamW beta1")
    beta2: float = key(0.95, "AdamW beta2")
    grad_clip: float = key(1.0, "clip gradients at this norm; 0 disables")
    # learning rate decay
    decay_lr: bool = key(True, "warm up then cosine-decay the learning rate")
    warmup_iters: int = key(2000, "linear warmup iterations")
    lr_decay_iters: int = key(600000, "iteration where the cosine reaches min_lr (~max_iters per Chinchilla)")
    min_lr: float = key(6e-5, "learning rate after decay (~learning_rate/10 per Chinchilla)")
    # system
    backend: str = key("nccl", "torch.distributed backend for GPU workers (CPU workers use gloo)")
    device: str = key("cuda", "'cuda' uses the cluster's GPUs when it has some; 'cpu' forces CPU workers")
    dtype: str = key(
        "auto", "'auto' (bfloat16 if supported, else float16 on CUDA, float32 on CPU), float32, bfloat16, float16"
    )
    compile: bool = key(True, "torch.compile the model (PyTorch 2)")
    compile_mode: str = key(
        "default",
        "torch.compile mode: default, reduce-overhead (CUDA graphs; for small "
        "models), max-autotune, max-autotune-no-cudagraphs",
    )
    compile_regions: bool = key(
        False,
        "compile each transformer block (one shared graph) instead of the whole "
        "model: compile time stops growing with n_layer; head and loss run eagerly",
    )
    compile_eval: bool = key(
        True,
        "also compile the eval forward; False evaluates eagerly, which skips a second "
        "compile (~14 s for shakespeare_char on an H100) and suits short runs",
    )
    attention: str = key(
        "auto", "scaled_dot_product_attention backend: auto (PyTorch picks), flash, cudnn, efficient, math"
    )
    # Ray
    data_dir: str = key("data", "folder holding <dataset>/train.bin, val.bin, meta.json")
    num_workers: int = key(0, "training workers; 0 = one per GPU in the cluster, or 1 on CPU")
    use_gpu: bool | None = key(None, "None = use GPUs when the cluster has them; True requires them")
    cpus_per_worker: float = key(0.0, "CPUs reserved per worker; 0 = share the cluster's CPUs")
    storage_path: str = key("", "Ray storage for checkpoints (a shared path or s3://...); '' = ~/ray_results")
    run_name: str = key("", "Ray run name; '' = out_dir's folder name, so rerunning a command resumes it")
    max_failures: int = key(0, "times Ray restarts the workers after a failure (-1 = always)")
    checkpoints_to_keep: int = key(2, "Ray checkpoints kept: the best by val loss (the latest is kept too)")
    seed: int = key(1337, "seed for the initial weights, the batches and dropout")
    data_order: str = key(
        "seeded",
        "seeded: batches are a function of (seed, iteration, rank), so resumes are "
        "exact and evals do not depend on the worker count; nanogpt: one worker "
        "replays nanoGPT's train.py random stream, to compare number for number",
    )
    max_nonfinite_steps: int = key(10, "stop after this many consecutive non-finite steps (0 = never)")
    local_mode: bool = key(
        False,
        "run the loop in this process with Ray Train's local mode (one process, no "
        "cluster, no restarts): for debugging and small CPU machines",
    )

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name), FIELD_TYPES[f.name]))
        choose("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        choose("device", self.device, ("cuda", "cpu"))
        choose("backend", self.backend, ("nccl", "gloo"))
        choose("compile_mode", self.compile_mode, COMPILE_MODES)
        choose("attention", self.attention, ATTENTION_BACKENDS)
        choose("data_order", self.data_order, ("seeded", "nanogpt"))
        if self.init_from not in INIT_CHOICES and not Path(self.init_from).expanduser().is_dir():
            raise ConfigError(
                f"init_from must be one of {', '.join(INIT_CHOICES)} or a local GPT-2 folder, got {self.init_from!r}"
            )
        for name in (
            "batch_size",
            "block_size",
            "n_layer",
            "n_head",
            "n_embd",
            "gradient_accumulation_steps",
            "eval_iters",
            "log_interval",
            "eval_interval",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in (
            "max_iters",
            "warmup_iters",
            "lr_decay_iters",
            "num_workers",
            "max_nonfinite_steps",
            "weight_decay",
            "grad_clip",
            "min_lr",
            "cpus_per_worker",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.decay_lr and self.warmup_iters > self.lr_decay_iters:
            raise ConfigError(
                f"warmup_iters ({self.warmup_iters}) must not exceed lr_decay_iters ({self.lr_decay_iters})"
            )
        if self.decay_lr and self.min_lr > self.learning_rate:
            raise ConfigError(f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})")
        if self.local_mode and self.num_workers > 1:
            raise ConfigError(f"local_mode runs one process; num_workers={self.num_workers} needs a Ray cluster")
        if self.max_failures < -1:
            raise ConfigError(f"max_failures must be -1 (always) or more, got {self.max_failures}")
        if self.checkpoints_to_keep < 1:
            raise ConfigError(f"checkpoints_to_keep must be at least 1, got {self.checkpoints_to_keep}")
        if self.init_from.startswith("gpt2") and self.block_size > 1024:
            raise ConfigError(f"GPT-2 weights have a 1024-token context; block_size {self.block_size} is larger")

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


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
INIT_CHOICES = ("scratch", "resume", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
FIELD_TYPES = typing.get_type_hints(TrainConfig)
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def check_known(name: str) -> None:
    if name not in DEFAULTS:
        close = difflib.get_close_matches(name, DEFAULTS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{name}'{hint}")


def choose(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


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
    raise ConfigError(f"config key '{name}' must be {kind}{' or None' if optional else ''}, got {value!r}")


# ---- nanoGPT-format config files, evaluated with a whitelist of AST nodes --------------------------

BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
UNARY_OPS = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
# Imports nanoGPT's own config files use for harmless things like a timestamped run name.
ALLOWED_IMPORTS = {"time"}


class _Evaluator:
    def __init__(self, where: str, names: dict):
        self.where, self.names = where, names

    def fail(self, node, what: str):
        raise ConfigError(f"{self.where}:{getattr(node, 'lineno', '?')}: {what} is not allowed in a config file")

    def eval(self, node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in self.names:
                return self.names[node.id]
            if node.id in ("True", "False", "None"):
                return {"True": True, "False": False, "None": None}[node.id]
            raise ConfigError(f"{self.where}:{node.lineno}: unknown name '{node.id}'")
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPS:
            left, right = self.eval(node.left), self.eval(node.right)
            if isinstance(left, str) != isinstance(right, str) and type(node.op) is not ast.Mult:
                raise ConfigError(f"{self.where}:{node.lineno}: cannot combine {left!r} and {right!r}")
            return BINARY_OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPS:
            return UNARY_OPS[type(node.op)](self.eval(node.operand))
        if isinstance(node, ast.Call) and not node.keywords:
            return self.call(node)
        self.fail(node, type(node).__name__)

    def call(self, node: ast.Call):
        func = node.func
        args = [self.eval(arg) for arg in node.args]
        if isinstance(func, ast.Name) and func.id in ("str", "int", "float") and len(args) == 1:
            return {"str": str, "int": int, "float": float}[func.id](args[0])
        if (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id == "time"
            and "time" in self.names.get("__imports__", ())
            and func.attr == "time"
            and not args
        ):
            import time

            return time.time()
        self.fail(node, f"calling {ast.unparse(func)}()")


def parse_config_file(path: str | Path) -> dict:
    """The `key = value` assignments of a nanoGPT-format config file, evaluated without exec."""
    path = Path(path)
    try:
        source = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    values: dict = {}
    imports: set[str] = set()
    for stmt in tree.body:
        if isinstance(stmt, ast.Import) and all(
            alias.name in ALLOWED_IMPORTS and not alias.asname for alias in stmt.names
        ):
            imports |= {alias.name for alias in stmt.names}
            continue
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
            continue  # a docstring
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            raise ConfigError(
                f"{path}:{stmt.lineno}: only `key = value` lines are allowed in a config file, "
                f"got: {ast.unparse(stmt).splitlines()[0]}"
            )
        name = stmt.targets[0].id
        check_known(name)
        # Later lines may refer to keys set earlier in the file, or to defaults.
        evaluator = _Evaluator(str(path), {**DEFAULTS, **values, "__imports__": imports})
        values[name] = evaluator.eval(stmt.value)
    return values


def parse_value(text: str) -> Any:
    """A command-line value: a Python literal when it is one, else the string itself (as nanoGPT)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_overrides(argv: list[str]) -> dict:
    """`--key=value` and `--key value` arguments; dashes in keys are underscores (`--num-workers`)."""
    values: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"expected --key=value, got {arg!r}")
        name, has_value, text = arg[2:].partition("=")
        if not has_value:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--{name} needs a value (--{name}=VALUE)")
            i += 1
            text = argv[i]
        name = name.replace("-", "_")
        check_known(name)
        values[name] = parse_value(text)
        i += 1
    return values


def read_config(argv: list[str]) -> tuple[TrainConfig, frozenset[str]]:
    """[CONFIG_FILE] [--key=value ...] -> a validated TrainConfig (file over defaults, flags over file),
    and the keys the user set (in the file or as flags), read once."""
    values: dict = {}
    if argv and not argv[0].startswith("-"):
        values.update(parse_config_file(argv[0]))
        argv = argv[1:]
    values.update(parse_overrides(argv))
    return TrainConfig.from_dict(values), frozenset(values)


def load_config(argv: list[str]) -> TrainConfig:
    """read_config without the explicit keys."""
    return read_config(argv)[0]


def config_help() -> str:
    """Every key with its default and description, for --help."""
    lines = ["config keys (set in a config file as `key = value`, or as --key=value):"]
    for f in dataclasses.fields(TrainConfig):
        lines.append(f"  --{f.name}={f.default!r:<14} {f.metadata['help']}")
    return "\n".join(lines)
