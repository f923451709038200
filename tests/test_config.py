"""TrainConfig: nanoGPT's defaults, config files read without exec, overrides, one-line errors."""

import time
from pathlib import Path

import pytest

from raygpt.config.cli import config_help, load_config
from raygpt.config.file import parse_config_file
from raygpt.config.schema import ConfigError, TrainConfig

REPO = Path(__file__).resolve().parents[1]

# nanoGPT's own config/finetune_shakespeare.py and train_gpt2.py, as fixtures: they must load unchanged.
NANOGPT_FINETUNE = """import time

out_dir = 'out-shakespeare'
eval_interval = 5
eval_iters = 40
wandb_log = False # feel free to turn on
wandb_project = 'shakespeare'
wandb_run_name = 'ft-' + str(time.time())

dataset = 'shakespeare'
init_from = 'gpt2-xl' # this is the largest GPT-2 model

# only save checkpoints if the validation loss improves
always_save_checkpoint = False

batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# finetune at constant LR
learning_rate = 3e-5
decay_lr = False
"""
NANOGPT_TRAIN_GPT2 = """wandb_log = True
wandb_project = 'owt'
wandb_run_name='gpt2-124M'

# these make the total batch size be ~0.5M
# 12 batch size * 1024 block size * 5 gradaccum * 8 GPUs = 491,520
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

max_iters = 600000
lr_decay_iters = 600000

eval_interval = 1000
eval_iters = 200
log_interval = 10

weight_decay = 1e-1
"""


def write(tmp_path, text, name="cfg.py"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def one_line_error(callable_, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as error:
        callable_(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_defaults_are_nanogpts():
    cfg = TrainConfig()
    assert (cfg.out_dir, cfg.eval_interval, cfg.log_interval, cfg.eval_iters) == ("out", 2000, 1, 200)
    assert (cfg.eval_only, cfg.always_save_checkpoint, cfg.init_from) == (False, True, "scratch")
    assert (cfg.wandb_log, cfg.wandb_project, cfg.wandb_run_name, cfg.dataset) == (False, "owt", "gpt2", "openwebtext")
    assert (cfg.gradient_accumulation_steps, cfg.batch_size, cfg.block_size) == (40, 12, 1024)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout, cfg.bias) == (12, 12, 768, 0.0, False)
    assert (cfg.learning_rate, cfg.max_iters, cfg.weight_decay, cfg.beta1, cfg.beta2) == (6e-4, 600000, 0.1, 0.9, 0.95)
    assert (cfg.grad_clip, cfg.decay_lr, cfg.warmup_iters, cfg.lr_decay_iters, cfg.min_lr) == (
        1.0,
        True,
        2000,
        600000,
        6e-5,
    )
    assert (cfg.backend, cfg.device, cfg.dtype, cfg.compile) == ("nccl", "cuda", "auto", True)


def test_nanogpt_config_files_load_unchanged(tmp_path):
    finetune = load_config([write(tmp_path, NANOGPT_FINETUNE)])
    assert finetune.init_from == "gpt2-xl" and finetune.learning_rate == 3e-5 and not finetune.decay_lr
    assert finetune.wandb_run_name.startswith("ft-") and finetune.gradient_accumulation_steps == 32
    gpt2 = load_config([write(tmp_path, NANOGPT_TRAIN_GPT2)])
    assert gpt2.gradient_accumulation_steps == 40 and gpt2.weight_decay == 0.1 and gpt2.wandb_log


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.py")), ids=lambda p: p.name)
def test_shipped_configs_load(path, monkeypatch):
    monkeypatch.setattr(time, "time", lambda: 1700000000.0)  # run names made from the time: read it twice alike
    cfg = load_config([str(path)])
    settings = parse_config_file(str(path))
    assert settings and {key: getattr(cfg, key) for key in settings} == settings


def test_shakespeare_char_config_has_nanogpts_values():
    cfg = load_config([str(REPO / "configs" / "train_shakespeare_char.py")])
    assert (cfg.out_dir, cfg.eval_interval, cfg.eval_iters, cfg.log_interval) == ("out-shakespeare-char", 250, 200, 10)
    assert (cfg.batch_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd) == (64, 256, 6, 6, 384)
    assert (cfg.dropout, cfg.learning_rate, cfg.max_iters, cfg.min_lr, cfg.beta2) == (0.2, 1e-3, 5000, 1e-4, 0.99)


def test_arithmetic_and_references(tmp_path):
    cfg = load_config(
        [
            write(
                tmp_path,
                "max_iters = 10 * (3 + 2)\nlr_decay_iters = max_iters\nwarmup_iters = -(-5)\n"
                "learning_rate = 1e-3 / 2\nmin_lr = learning_rate / 10\n",
            )
        ]
    )
    assert (cfg.max_iters, cfg.lr_decay_iters, cfg.warmup_iters) == (50, 50, 5)
    assert cfg.learning_rate == 5e-4 and cfg.min_lr == pytest.approx(5e-5)


def test_overrides_in_both_forms(tmp_path):
    cfg = load_config(
        [
            write(tmp_path, "batch_size = 4\n"),
            "--batch_size=8",
            "--num-workers",
            "2",
            "--dataset=shakespeare_char",
            "--compile",
            "False",
            "--use_gpu=None",
            "--learning_rate=1",
        ]
    )
    assert (cfg.batch_size, cfg.num_workers, cfg.dataset, cfg.compile, cfg.use_gpu) == (
        8,
        2,
        "shakespeare_char",
        False,
        None,
    )
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)  # an int is fine for a float


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--learning_rat=1e-3"], "unknown config key 'learning_rat' (did you mean 'learning_rate'?)"),
        (["--batch_size=12.5"], "config key 'batch_size' must be an int, got 12.5"),
        (["--compile=maybe"], "config key 'compile' must be a bool, got 'maybe'"),
        (["--dtype=fp8"], "dtype must be one of auto, float32, bfloat16, float16, got 'fp8'"),
        (["--device=tpu"], "device must be one of cuda, cpu, got 'tpu'"),
        (["--n_embd=100"], "n_embd (100) must be divisible by n_head (12)"),
        (["--warmup_iters=10", "--lr_decay_iters=5"], "warmup_iters (10) must not exceed lr_decay_iters (5)"),
        (["--min_lr=1"], "min_lr (1.0) must not exceed learning_rate"),
        (["--batch_size=0"], "batch_size must be at least 1"),
        (["--dropout=1.5"], "dropout must be in [0, 1)"),
        (["--batch_size"], "--batch_size needs a value"),
        (["--init_from=gpt2", "--block_size=2048"], "1024-token context"),
    ],
)
def test_bad_values_are_one_line_errors(argv, expected):
    assert expected in one_line_error(load_config, argv)


def test_an_init_from_that_names_nothing_is_refused_where_folders_are_checked():
    """validate() reads no disk, so it cannot tell a typo from a folder: the launcher's GPT-2 folder check
    (core/hf.py, before Ray starts) refuses it, with validate's old message."""
    from raygpt.core.hf import check_gpt2_folder

    load_config(["--init_from=gpt3"])
    assert "init_from must be one of scratch, resume, gpt2" in one_line_error(check_gpt2_folder, "gpt3", 1024)


@pytest.mark.parametrize(
    "line",
    [
        "__import__('os').system('touch PWNED')",
        "batch_size = __import__('os').system('touch PWNED')",
        "batch_size = open('PWNED', 'w')",
        "import os",
        "batch_size = [x for x in ().__class__.__base__.__subclasses__()]",
        'exec(\'open("PWNED", "w")\')',
    ],
)
def test_config_files_cannot_run_code(tmp_path, monkeypatch, line):
    monkeypatch.chdir(tmp_path)
    message = one_line_error(parse_config_file, write(tmp_path, f"max_iters = 5\n{line}\n"))
    assert "cfg.py:2" in message
    assert not (tmp_path / "PWNED").exists()


def test_round_trip_and_help():
    cfg = TrainConfig(batch_size=3, use_gpu=True)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert "unknown config key 'nope'" in one_line_error(TrainConfig.from_dict, {"nope": 1})
    text = config_help()
    assert "--gradient_accumulation_steps=40" in text and "--num_workers" in text


def test_num_workers_min_max_is_an_elastic_range():
    from raygpt.config.cli import read_config

    cfg, keys = read_config(["--num-workers", "2-4"])
    assert (cfg.num_workers, cfg.max_workers) == (2, 4) and {"num_workers", "max_workers"} <= keys
    with pytest.raises(ConfigError, match="1 <= num_workers <= max_workers, got 4-2"):
        read_config(["--num-workers=4-2"])


def test_an_elastic_range_with_a_count_that_cannot_split_the_batch_is_refused():
    from raygpt.driver.plan import check_elastic_range
    from raygpt.errors import LaunchError

    check_elastic_range(TrainConfig(num_workers=1, max_workers=2, gradient_accumulation_steps=4))
    with pytest.raises(LaunchError, match=r"includes 3, which gradient_accumulation_steps \(4\) cannot be divided"):
        check_elastic_range(TrainConfig(num_workers=2, max_workers=4, gradient_accumulation_steps=4))


# Each key's role, written out: what the rest of raygpt derives from the keys' metadata. A new key gets its
# role where it is declared; this list changes with it, on purpose.
FREE_ON_A_RERUN = {
    "out_dir", "eval_interval", "log_interval", "eval_iters", "eval_only", "always_save_checkpoint",
    "async_checkpoint", "init_from", "wandb_log", "wandb_project", "wandb_run_name", "max_iters", "decay_lr",
    "warmup_iters", "lr_decay_iters", "min_lr", "backend", "compile", "compile_mode", "compile_regions",
    "ddp_split_graphs", "compile_eval", "compile_cache", "attention", "deterministic", "parallelism",
    "fsdp_reshard_after_forward", "activation_checkpointing", "data_dir", "num_workers", "max_workers",
    "elastic_resize_interval_s", "use_gpu", "cpus_per_worker", "storage_path", "run_name", "max_failures",
    "max_preemption_failures", "checkpoints_to_keep", "local_mode", "check_memory", "tensorboard", "evals",
    "eval_examples", "eval_cpus", "eval_gpus", "checkpoint_score",
}  # fmt: skip
SHAPE_GRAPHS = {"batch_size", "dtype", "compile_mode", "compile_regions", "compile_eval", "parallelism",
                "activation_checkpointing", "eval_iters", "fp8", "ddp_split_graphs"}  # fmt: skip
SHARED_BY_A_SWEEP = {"out_dir", "run_name", "storage_path", "data_dir", "num_workers", "use_gpu", "cpus_per_worker",
                     "eval_only", "evals", "eval_examples", "eval_cpus", "eval_gpus", "checkpoint_score"}  # fmt: skip


def test_the_key_lists_derived_from_the_keys_metadata_are_todays():
    from raygpt.config.schema import FREE_TO_CHANGE, GRAPH_KEYS, MODEL_KEYS, NOT_SAMPLED

    assert FREE_TO_CHANGE == FREE_ON_A_RERUN
    assert set(GRAPH_KEYS) == SHAPE_GRAPHS and len(GRAPH_KEYS) == len(SHAPE_GRAPHS)
    assert set(NOT_SAMPLED) == SHARED_BY_A_SWEEP and len(NOT_SAMPLED) == len(SHARED_BY_A_SWEEP)
    assert MODEL_KEYS == ("block_size", "n_layer", "n_head", "n_embd", "bias")  # TrainConfig's (nanoGPT's) order


def test_every_key_has_a_role_on_a_rerun_and_its_help():
    import dataclasses

    from raygpt.config.schema import RERUN_ROLES

    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["rerun"] in RERUN_ROLES and f.metadata["help"], f.name
        assert isinstance(f.metadata["graph"], bool) and isinstance(f.metadata["sweep"], bool), f.name
    named = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["rerun"] == "named"}
    assert named == {"dataset", "gradient_accumulation_steps", "batch_size", "dropout", "learning_rate",
                     "weight_decay", "beta1", "beta2", "grad_clip", "device", "dtype", "fp8", "seed", "data_order",
                     "max_nonfinite_steps"}  # fmt: skip


def test_validation_reads_nothing_from_disk(monkeypatch, tmp_path):
    """TrainConfig is built on every worker (from_dict) and for every search-space value (replace): none of
    it may read the driver's disk, or a worker's, where a relative path would name something else."""
    import builtins
    import os

    def no_disk(*args, **kwargs):
        raise AssertionError("validate() touched the disk")

    values = dict(init_from="./somewhere/gpt2-local", block_size=4096, out_dir="out", data_dir="data")
    with monkeypatch.context() as patch:
        for module, name in ((os, "stat"), (os, "lstat"), (os, "scandir"), (os, "listdir"), (builtins, "open")):
            patch.setattr(module, name, no_disk)
        cfg = TrainConfig.from_dict(values)
        assert cfg.replace(init_from="gpt2", block_size=512).init_from == "gpt2"
    assert cfg.init_from == "./somewhere/gpt2-local"


def test_plain_names_are_one_folder():
    from raygpt.config.schema import is_plain_name

    assert all(is_plain_name(name) for name in ("run", "run-1", " run", "a.b", "..."))
    assert not any(is_plain_name(name) for name in ("", ".", "..", "a/b", "/", "runs/"))
