"""Bad input and faults, fast tier (no Ray): config files and values, datasets, and data preparation.

Every refusal is one line (`error: ...` and exit status 2 for a CLI), and nothing is written or left
behind: no output, no temporary file, no half-made dataset folder.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from raygpt.config.cli import load_config
from raygpt.config.file import parse_config_file
from raygpt.config.schema import ConfigError, TrainConfig
from raygpt.core.data import DataError, _sample_chunks, _wider_token_bits, validate_dataset
from raygpt.core.hf import check_gpt2_folder
from raygpt.core.model import GPT
from raygpt.core.tokenizer import MetaError, declared_token_dtype, load_meta
from raygpt.errors import EXIT_INTERRUPTED, EXIT_REFUSED, RaygptError
from raygpt.prep.corpus import prepare_corpus
from raygpt.prep.dataset import prepare_dataset
from raygpt.prep.output import PrepareError
from raygpt.prep.shakespeare import prepare_shakespeare_char
from raygpt.prepare import main

REPO = Path(__file__).resolve().parents[1]


def one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message, message
    assert len(message) < 400, message  # long values are shortened, not echoed
    return message


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for a folder): what a refusal must leave unchanged."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() or p.is_symlink() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


# ---- A. config files: size first, then evaluate; every error one line -----------------------------

# Each runs in a subprocess with a timeout: a regression would compute for hours (or eat the memory)
# in C code that no signal interrupts.
TOO_LARGE = [
    "max_iters = 10**10**10",
    "max_iters = 2**100000000",
    "max_iters = (-3)**(10**8)",
    "out_dir = 'a'*10**10",
    "out_dir = 10**10 * 'ab'",
    "out_dir = 'x' * 5000",
    "out_dir = str(10**5000)",
    "max_iters = int('9'*100000)",
    "max_iters = int('9'*1000)",
    "max_iters = 2**1024 * 2**1024",
    "out_dir = '" + "y" * 5000 + "'",
]
FORMATTING = ["out_dir = '%0999999999d' % 1", "out_dir = '%099999999s' % 'x'", "out_dir = 'run-%s' % 'a'"]


def parse_in_subprocess(tmp_path, line: str) -> str:
    path = tmp_path / "cfg.py"
    path.write_text(f"max_iters = 5\n{line}\n")
    code = textwrap.dedent(f"""
        from raygpt.config.file import parse_config_file
        from raygpt.config.schema import ConfigError
        try:
            parse_config_file({str(path)!r})
        except ConfigError as e:
            print(e)
        else:
            print('accepted')
    """)
    start = time.time()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr, result.stderr[-2000:]
    assert time.time() - start < 30
    return result.stdout.strip()


@pytest.mark.parametrize("line", TOO_LARGE + FORMATTING, ids=lambda s: s[:40])
def test_huge_results_are_refused_before_they_are_computed(tmp_path, line):
    message = parse_in_subprocess(tmp_path, line)
    assert message.startswith(f"{tmp_path / 'cfg.py'}:2: ") and "\n" not in message and len(message) < 400
    assert "too large" in message or "too long" in message or "string formatting with %" in message


@pytest.mark.parametrize(
    "line, needle",
    [
        ("max_iters = 1/0", "cannot evaluate 1/0: division by zero"),
        ("max_iters = 7 % 0", "modulo by zero"),
        ("learning_rate = 10.0**400", "cannot evaluate 10.0**400: Numerical result out of range"),
        ("learning_rate = (2**1023 + (2**1023 - 1)) / 1", "integer division result too large for a float"),
        ("learning_rate = float(2**1023 + (2**1023 - 1))", "int too large to convert to float"),
        ("max_iters = int('x')", "invalid literal for int()"),
        ("max_iters = int(float('inf'))", "cannot convert float infinity to integer"),
        ("max_iters = int(float('nan'))", "cannot convert float NaN to integer"),
        ("max_iters = float('abc')", "could not convert string to float"),
        ("out_dir = -'a'", "bad operand type for unary -"),
        ("max_iters = None + 1", "unsupported operand type"),
        ("out_dir = 'a' + 1", "cannot combine 'a' and 1"),
        ("out_dir = 'a' * 'b'", "cannot combine 'a' and 'b'"),
        ("out_dir = 'a' * 2.5", "can't multiply sequence"),
        ("learning_rate = (-8)**0.5", "is a complex number"),
        ("max_iters = (\n    1 +\n    1 // 0)", "integer division or modulo by zero"),
    ],
)
def test_evaluation_errors_are_one_line_with_file_and_line(tmp_path, line, needle):
    path = tmp_path / "cfg.py"
    path.write_text(f"max_iters = 5\n{line}\n")
    with pytest.raises(ConfigError) as error:
        parse_config_file(path)
    message = one_line(error.value)
    assert message.startswith(f"{path}:") and needle in message
    assert message.split(":")[1] in ("2", "3", "4")


@pytest.mark.parametrize(
    "expression",
    [
        "-" * 100_000 + "1",
        "-(" * 50_000 + "1" + ")" * 50_000,
        "(" * 100_000 + "1" + ")" * 100_000,
        "+".join(["1"] * 100_000),
        "not " * 100_000 + "1",
        " if 1 else ".join(["1"] * 50_000),
        "[" * 100_000 + "]" * 100_000,
    ],
    ids=["unary", "unary-parens", "parens", "sum", "not", "ifexp", "lists"],
)
def test_deep_nesting_is_one_line(tmp_path, expression):
    path = tmp_path / "cfg.py"
    path.write_text(f"batch_size = 4\nmax_iters = {expression}\n")
    with pytest.raises(ConfigError) as error:
        parse_config_file(path)
    message = one_line(error.value)
    assert message.startswith(f"{path}:2: ") and ("nested too deeply" in message or "syntax error" in message)


def test_a_short_nested_expression_still_evaluates(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("max_iters = " + "-(" * 40 + "7" + ")" * 40 + "\nmin_lr = 1 / 10**20\nout_dir = 'ab' * 2048\n")
    assert parse_config_file(path) == {"max_iters": 7, "min_lr": 1e-20, "out_dir": "ab" * 2048}


def test_unreadable_config_files_are_one_line(tmp_path):
    binary = tmp_path / "model.pt"
    binary.write_bytes(b"\x80\x02}q\x00(X\x05\x00\x00\x00model\xff\xfe")
    nul = tmp_path / "nul.py"
    nul.write_bytes(b"batch_size = 4\nmax_iters = 1\x00\n")
    big = tmp_path / "big.py"
    big.write_text("# padding\n" * 200_000)
    loop = tmp_path / "loop.py"
    loop.symlink_to(loop)
    cases = [
        (binary, f"{binary}: not a text file (byte 0 is not UTF-8)"),
        (nul, f"{nul}:2: a NUL byte: not a text file"),
        (tmp_path, f"config file {tmp_path} is a folder"),
        (Path(os.devnull), f"config file {os.devnull} is not a regular file"),
        (loop, f"cannot read config file {loop}: Too many levels of symbolic links"),
        (big, "is larger than 1 MiB"),
        (tmp_path / "missing.py", "No such file or directory"),
    ]
    for path, needle in cases:
        with pytest.raises(ConfigError) as error:
            parse_config_file(path)
        assert needle in one_line(error.value)


def test_a_utf8_config_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_bytes("\ufeffwandb_run_name = 'é'\n".encode())
    assert parse_config_file(path) == {"wandb_run_name": "é"}


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--max_iters=" + "-" * 100_000 + "1"], "is nested too deeply to read"),
        (["--max_iters=" + "[" * 100_000 + "]" * 100_000], "config key 'max_iters' must be an int"),
        (["--max_iters=" + "9" * 5000], "config key 'max_iters' must be an int, got '9999"),
        (["--max_iters=" + "9" * 4000], "max_iters must fit in 64 bits"),
        (["--batch_size=[" + "1," * 20_000 + "]"], "config key 'batch_size' must be an int, got [1, 1"),
        (["--batch_size={[1]: 2}"], "config key 'batch_size' must be an int, got '{[1]: 2}'"),
        (["--out_dir=" + "d" * 5000], "out_dir is 5,000 characters long; at most 4,096"),
    ],
    ids=["unary", "lists", "digits-5000", "digits-4000", "long-list", "unhashable", "long-path"],
)
def test_cli_values_nested_or_huge_are_one_line(argv, needle):
    with pytest.raises(ConfigError) as error:
        load_config(argv)
    assert needle in one_line(error.value)


@pytest.mark.parametrize(
    "line, needle",
    [
        ("out_dir = f'{1:>999999999}'", "f'{1:>999999999}' (an f-string) is not allowed"),
        ("out_dir = b'abc'", "b'abc' (a bytes value) is not allowed"),
        ("learning_rate = 2j", "2j (a complex number) is not allowed"),
        ("batch_size = [1, 2]", "[1, 2] (a list) is not allowed"),
        ("batch_size = {'a': 1}", "{'a': 1} (a dict) is not allowed"),
        ("max_iters = 1 << 10**9", "1 << 10**9 (an operator other than + - * / // % **) is not allowed"),
        ("max_iters = [i for i in range(10**9)]", "(a comprehension) is not allowed"),
        ("max_iters = time.time", "time.time (an attribute) is not allowed"),
        ("out_dir = 'abc'[0]", "'abc'[0] (indexing) is not allowed"),
        ("max_iters = int(x='5')", "int(x='5') (a call with keyword arguments) is not allowed"),
        ("max_iters = int('ff', 16)", "int('ff', 16): int() takes exactly one argument"),
        ("max_iters = int()", "int(): int() takes exactly one argument"),
    ],
)
def test_what_a_config_value_cannot_be_is_named_as_written(tmp_path, line, needle):
    path = tmp_path / "cfg.py"
    path.write_text(f"max_iters = 5\n{line}\n")
    with pytest.raises(ConfigError) as error:
        parse_config_file(path)
    message = one_line(error.value)
    assert message.startswith(f"{path}:2: ") and needle in message
    assert "JoinedStr" not in message and "Constant" not in message and "BinOp" not in message


@pytest.mark.parametrize("literal", ["9" * 300_000, "0x" + "f" * 300_000, "1" + "0" * 500 + ".5"])
def test_long_number_literals_are_refused_before_the_parser_reads_them(tmp_path, literal):
    path = tmp_path / "cfg.py"
    path.write_text(f"batch_size = 4\nmax_iters = {literal}\n")
    with pytest.raises(ConfigError) as error:
        parse_config_file(path)
    message = one_line(error.value)
    assert message.startswith(f"{path}:2: a ") and "-character number is too large" in message
    assert "set_int_max_str_digits" not in message


def test_statements_on_one_line_are_counted_one_by_one(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("; ".join(f"max_iters = {i}" for i in range(300)) + "\n")
    assert parse_config_file(path) == {"max_iters": 299}


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--out_dir="], "out_dir must not be empty (use '.' for the current folder)"),
        (["--data_dir= "], "data_dir must not be empty"),
        (["--dataset="], "dataset must not be empty: it names the dataset's folder under data_dir"),
        (["--init_from="], "init_from must be one of scratch, resume"),
        (["--run_name=.."], "run_name must be a plain name, not a path, got '..'"),
        (["--run_name=runs/a"], "run_name must be a plain name, not a path, got 'runs/a'"),
        (["--out_dir=a\nb"], "out_dir must not contain control characters"),
        (["--wandb_run_name=a\x1b[31mred"], "wandb_run_name must not contain control characters"),
        (["--out_dir=\ud800"], "out_dir is not valid text (a lone surrogate)"),
        (["--num-workers=1-0"], "--num-workers MIN-MAX needs 1 <= MIN <= MAX, got 1-0"),
        (["--num-workers=3-0"], "--num-workers MIN-MAX needs 1 <= MIN <= MAX, got 3-0"),
    ],
)
def test_names_that_would_quietly_mean_something_else_are_refused(argv, needle):
    with pytest.raises(ConfigError) as error:
        load_config(argv)
    assert needle in one_line(error.value)


def test_a_surrogate_escape_from_the_command_line_is_still_a_path():
    """Bytes that are not UTF-8 in argv arrive as surrogate escapes: a real file name, kept."""
    name = os.fsdecode(b"out-\xff")
    assert load_config([f"--out_dir={name}"]).out_dir == name


def test_a_string_key_takes_a_value_that_reads_as_a_number_as_its_text(tmp_path):
    cfg = load_config(["--out_dir=123", "--run_name=2024", "--wandb_run_name=1.5", "--wandb_project=None"])
    assert (cfg.out_dir, cfg.run_name, cfg.wandb_run_name, cfg.wandb_project) == ("123", "2024", "1.5", "None")
    assert load_config(["--out_dir='quoted'"]).out_dir == "quoted"


# ---- B. values --------------------------------------------------------------------------------------


def gpt2_folder(path: Path, weights: str | None = "model.safetensors", **config) -> Path:
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps({"n_layer": 2, "n_head": 2, "n_embd": 8, "vocab_size": 50257, **config})
    )
    if weights:
        (path / weights).write_bytes(b"")
    return path


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--seed=-1"], "seed must be in [0, 2**32), got -1"),
        ([f"--seed={2**32}"], "seed must be in [0, 2**32), got 4294967296"),
        ([f"--seed={2**70}"], "seed must fit in 64 bits"),
        (["--beta1=1.0"], "beta1 must be in [0, 1), got 1.0"),
        (["--beta1=-0.5"], "beta1 must be in [0, 1), got -0.5"),
        (["--beta2=1.5"], "beta2 must be in [0, 1), got 1.5"),
        (["--learning_rate=1e400"], "learning_rate must be a finite number, got inf"),
        (["--min_lr=-1e400"], "min_lr must be a finite number, got -inf"),
        (["--grad_clip=1e999"], "grad_clip must be a finite number, got inf"),
        (["--cpus_per_worker=1e400"], "cpus_per_worker must be a finite number"),
        ([f"--max_iters={2**63}"], "max_iters must fit in 64 bits"),
        ([f"--eval_iters={-(2**64)}"], "eval_iters must fit in 64 bits"),
    ],
)
def test_absurd_values_are_one_line(argv, needle):
    with pytest.raises(ConfigError) as error:
        load_config(argv)
    assert needle in one_line(error.value)


@pytest.mark.parametrize("name", ["dropout", "beta1", "beta2", "weight_decay", "grad_clip", "learning_rate", "min_lr"])
@pytest.mark.parametrize("value", ["float('nan')", "float('inf')", "1e308 * 10"])
def test_non_finite_floats_from_a_config_file(tmp_path, name, value):
    path = tmp_path / "cfg.py"
    path.write_text(f"{name} = {value}\n")
    with pytest.raises(ConfigError) as error:
        load_config([str(path)])
    assert f"{name} must be a finite number" in one_line(error.value)


def test_strings_with_nul_are_refused():
    with pytest.raises(ConfigError) as error:
        TrainConfig(out_dir="out\0x")
    assert "out_dir must not contain a NUL character" in one_line(error.value)


def test_seed_range_is_what_numpy_and_torch_accept():
    for seed in (0, 1337, 2**32 - 1):
        assert TrainConfig(seed=seed).seed == seed
        np.random.default_rng([seed, 0, 1])
        np.random.seed(seed)  # the legacy RandomState takes [0, 2**32) only: the narrowest of them
        torch.manual_seed(seed)


@pytest.mark.parametrize(
    "setup, needle",
    [
        ("empty", "config.json: No such file or directory"),
        ("config_only", "it has neither model.safetensors nor pytorch_model.bin"),
        ("bad_json", "config.json is not valid JSON"),
        ("list_json", "config.json is not a JSON object"),
        ("no_n_layer", "config.json needs a positive integer n_layer, got None"),
        ("bool_vocab", "config.json needs a positive integer vocab_size, got True"),
        ("indivisible", "n_embd 10 is not divisible by n_head 3"),
        ("config_folder", "config file"),
        ("short_context", "have a 128-token context; block_size 256 is larger"),
    ],
)
def test_init_from_a_folder_that_is_not_a_gpt2_checkpoint(tmp_path, setup, needle):
    folder = tmp_path / "hf"
    if setup == "empty":
        folder.mkdir()
    elif setup == "config_only":
        gpt2_folder(folder, weights=None)
    elif setup == "bad_json":
        gpt2_folder(folder)
        (folder / "config.json").write_text("{oops")
    elif setup == "list_json":
        gpt2_folder(folder)
        (folder / "config.json").write_text("[]")
    elif setup == "no_n_layer":
        gpt2_folder(folder, n_layer=None)
    elif setup == "bool_vocab":
        gpt2_folder(folder, vocab_size=True)
    elif setup == "indivisible":
        gpt2_folder(folder, n_head=3, n_embd=10)
    elif setup == "config_folder":
        folder.mkdir()
        (folder / "config.json").mkdir()
        (folder / "model.safetensors").write_bytes(b"")
    elif setup == "short_context":
        gpt2_folder(folder, weights="pytorch_model.bin", n_positions=128)
    with pytest.raises(ConfigError) as error:
        check_gpt2_folder(str(folder), block_size=256)
    message = one_line(error.value)
    assert needle in message and ("not a GPT-2 checkpoint folder" in message or "context" in message)
    if setup != "short_context":  # where the weights are read (a worker, sample): the same refusal
        with pytest.raises(ConfigError) as error:
            GPT.from_pretrained(str(folder))
        assert one_line(error.value) == message


def test_init_from_a_gpt2_folder_is_accepted(tmp_path):
    folder = gpt2_folder(tmp_path / "hf", n_positions=512)
    assert TrainConfig(init_from=str(folder), block_size=512).init_from == str(folder)
    assert check_gpt2_folder(str(folder), block_size=512) == str(folder.resolve())


def test_a_relative_gpt2_folder_is_made_absolute_for_the_workers(tmp_path, monkeypatch):
    """Ray's workers run in a session folder of their own: the launcher hands them the folder's absolute
    path, which names the same folder from anywhere (TrainConfig itself reads no disk)."""
    gpt2_folder(tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    assert check_gpt2_folder("./hf", block_size=64) == str((tmp_path / "hf").resolve())
    with pytest.raises(ConfigError, match="init_from must be one of scratch, resume, gpt2"):
        check_gpt2_folder("./elsewhere", block_size=64)


# ---- C. datasets ------------------------------------------------------------------------------------


def write_dataset(directory: Path, n_tokens: int = 20_000, dtype=np.uint16, meta: dict | None = None) -> Path:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(0, 65, n_tokens).astype(dtype).tofile(directory / f"{split}.bin")
    if meta is not None:
        (directory / "meta.json").write_text(json.dumps(meta))
    return directory


CHAR_META = {"vocab_size": 65, "tokenizer": "gpt2"}


@pytest.mark.parametrize(
    "damage, needle",
    [
        ("dataset_is_file", "is not a folder; it must hold train.bin, val.bin and meta.json"),
        ("dataset_loop", "Too many levels of symbolic links"),
        ("train_loop", "train.bin: Too many levels of symbolic links"),
        ("val_loop", "val.bin: Too many levels of symbolic links"),
        ("meta_loop", "meta.json: Too many levels of symbolic links"),
        ("meta_folder", "meta.json is a folder, not a file"),
        ("meta_device", "meta.json is not a regular file"),
        ("meta_not_utf8", "meta.json is not valid JSON"),
        ("meta_deep", "meta.json is not valid JSON"),
        ("vocab_1e11", "vocab_size of at most 65,536"),
        ("vocab_float", "vocab_size of at most 65,536"),
        ("vocab_bool", "vocab_size of at most 65,536"),
        ("vocab_70000", "vocab_size of at most 65,536 (token ids are uint16)"),
        ("chars_repeated", "characters of the vocabulary, each once"),
        ("train_folder", "train.bin is a folder, not a token file"),
        ("val_folder", "val.bin is a folder, not a token file"),
        ("train_device", "train.bin is not a regular file"),
        ("meta_dtype_uint32", "meta.json says the tokens are 'uint32', but raygpt reads uint16 token files"),
        ("uint32_no_dtype", "train.bin looks like 32-bit tokens (every second 16-bit word is 0)"),
        ("uint32_no_meta", "train.bin looks like 32-bit tokens"),
        ("int64_no_meta", "train.bin looks like 64-bit tokens"),
        ("uint32_small_val", "val.bin looks like 32-bit tokens"),
    ],
)
def test_bad_datasets_are_one_line_and_untouched(tmp_path, damage, needle):
    data = tmp_path / "d"
    if damage == "dataset_is_file":
        data.write_bytes(b"not a folder")
    elif damage == "dataset_loop":
        data.symlink_to(data)
    elif damage in ("uint32_no_dtype", "uint32_no_meta", "int64_no_meta"):
        write_dataset(
            data,
            dtype=np.int64 if damage.startswith("int64") else np.uint32,
            meta=CHAR_META if damage == "uint32_no_dtype" else None,
        )
    elif damage == "meta_dtype_uint32":
        write_dataset(data, dtype=np.uint32, meta={**CHAR_META, "dtype": "uint32"})
    elif damage == "uint32_small_val":
        write_dataset(data)
        np.arange(1, 601, dtype=np.uint32).tofile(data / "val.bin")  # 600 tokens: 1,200 16-bit words
    else:
        write_dataset(data, meta={**CHAR_META, "dtype": "uint16"})
        split = damage.split("_")[0]
        if damage in ("train_loop", "val_loop", "meta_loop"):
            (data / f"{split}.{'json' if split == 'meta' else 'bin'}").unlink()
            (data / f"{split}.{'json' if split == 'meta' else 'bin'}").symlink_to(data / f"{split}.x")
            (data / f"{split}.x").symlink_to(data / f"{split}.{'json' if split == 'meta' else 'bin'}")
        elif damage == "meta_folder":
            (data / "meta.json").unlink()
            (data / "meta.json").mkdir()
        elif damage == "meta_device":
            (data / "meta.json").unlink()
            (data / "meta.json").symlink_to(os.devnull)
        elif damage == "meta_not_utf8":
            (data / "meta.json").write_bytes(b'{"vocab_size": 65, "tokenizer": "\xff"}')
        elif damage == "meta_deep":
            (data / "meta.json").write_text("[" * 100_000 + "]" * 100_000)
        elif damage.startswith("vocab_"):
            vocab = {"vocab_1e11": 10**11, "vocab_float": 1e11, "vocab_bool": True, "vocab_70000": 70_000}[damage]
            (data / "meta.json").write_text(json.dumps({**CHAR_META, "vocab_size": vocab}))
        elif damage == "chars_repeated":
            (data / "meta.json").write_text(
                json.dumps({"vocab_size": 3, "tokenizer": "char", "chars": ["a", "b", "a"]})
            )
        elif damage in ("train_folder", "val_folder"):
            (data / f"{split}.bin").unlink()
            (data / f"{split}.bin").mkdir()
        elif damage == "train_device":
            (data / "train.bin").unlink()
            (data / "train.bin").symlink_to(os.devnull)
    before = tree(tmp_path)
    with pytest.raises(DataError) as error:
        validate_dataset(data, block_size=32, vocab_size=65)
    assert needle in one_line(error.value)
    assert isinstance(error.value, RaygptError)
    assert tree(tmp_path) == before


def test_load_meta_refusals_are_raygpt_errors(tmp_path):
    data = write_dataset(tmp_path / "d", meta={**CHAR_META, "vocab_size": 10**11})
    with pytest.raises(MetaError) as error:
        load_meta(data)
    assert isinstance(error.value, RaygptError) and isinstance(error.value, ValueError)
    (data / "meta.json").unlink()
    (data / "meta.json").symlink_to(data / "meta.json")
    with pytest.raises(MetaError, match="Too many levels of symbolic links"):
        load_meta(data)


def test_a_bool_vocab_size_in_meta_pkl_is_refused(tmp_path):
    import pickle

    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": True, "itos": {0: "a"}}))
    with pytest.raises(MetaError) as error:
        load_meta(tmp_path)
    assert "expected a dict with vocab_size (1 to 65,536)" in one_line(error.value)


@pytest.fixture(scope="module")
def real_datasets(tmp_path_factory, shakespeare_path) -> list[Path]:
    """shakespeare_char and GPT-2 BPE shakespeare, as prepare writes them."""
    data_dir = tmp_path_factory.mktemp("real")
    return [prepare_dataset(name, data_dir, shakespeare_path) for name in ("shakespeare_char", "shakespeare")]


def test_prepare_declares_the_token_dtype(real_datasets):
    for dataset in real_datasets:
        assert json.loads((dataset / "meta.json").read_text())["dtype"] == "uint16"
        assert declared_token_dtype(dataset) == "uint16"
        assert "dtype" not in load_meta(dataset)  # load_meta is the vocabulary


def test_real_uint16_data_never_looks_wide(real_datasets, tmp_path):
    for dataset in real_datasets:
        vocab_size = load_meta(dataset)["vocab_size"]
        nanogpt_style = tmp_path / dataset.name
        nanogpt_style.mkdir()
        for split in ("train", "val"):  # as nanoGPT prepares it: no meta.json, so the heuristic runs
            (nanogpt_style / f"{split}.bin").write_bytes((dataset / f"{split}.bin").read_bytes())
        validate_dataset(nanogpt_style, block_size=256, vocab_size=vocab_size)
        for split in ("train", "val"):
            tokens = np.fromfile(dataset / f"{split}.bin", dtype=np.uint16)
            for length in (600, 2048, 20_000, 200_000):
                for start in range(0, max(1, len(tokens) - length), max(1, (len(tokens) - length) // 40)):
                    assert _wider_token_bits(_sample_chunks(tokens[start : start + length])) is None


def test_uint32_data_converted_as_the_hint_says_is_accepted(tmp_path):
    data = write_dataset(tmp_path / "d", dtype=np.uint32)
    with pytest.raises(DataError) as error:
        validate_dataset(data, block_size=32, vocab_size=65)
    assert "np.fromfile(path, dtype=np.uint32).astype(np.uint16).tofile(path)" in one_line(error.value)
    for split in ("train", "val"):
        path = data / f"{split}.bin"
        np.fromfile(path, dtype=np.uint32).astype(np.uint16).tofile(path)
    validate_dataset(data, block_size=32, vocab_size=65)


# ---- D. prepare -------------------------------------------------------------------------------------


def run_prepare(argv: list, capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own refusals exit from parse_args
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def assert_refused(code: int, err: str, needle: str) -> None:
    assert code == EXIT_REFUSED, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert needle in err, err


def write_parquet(path: Path, **columns) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize(
    "case, needle",
    [
        ("latin1_char", "latin1.txt is not UTF-8 text (byte 10)"),
        ("latin1_corpus", "latin1.txt is not UTF-8 text"),
        ("too_many_chars", "has 70,000 distinct characters, but character token ids are uint16 (at most 65,536)"),
        ("folder_input_char", "--input {tmp}/in is a folder; pass a file"),
        ("folder_input_corpus", "--input {tmp}/in is a folder; pass a file, or a glob such as '{tmp}/in/*.txt'"),
        ("input_loop", "cannot read input {tmp}/loop.txt: Too many levels of symbolic links"),
        ("input_device", "is not a regular file"),
        ("int_column", "column 'text' holds int64, not text (columns: text, id)"),
        ("binary_column", "column 'text' holds binary, not text"),
        ("corrupt_parquet", "bad.parquet is not a readable parquet file"),
        ("threads_zero", "--num-threads must be from 1 to 1024, got 0"),
        ("threads_negative", "--num-threads must be from 1 to 1024, got -3"),
        ("threads_huge", "--num-threads must be from 1 to 1024, got 1000000000"),
        ("threads_text", "argument --num-threads: invalid int value: 'many'"),
        ("val_fraction_nan", "--val-fraction must be in (0, 1), got nan"),
        ("seed_negative", "--seed must not be negative"),
        ("data_dir_is_file", "{tmp}/out is a file, not a folder for the outputs"),
        ("data_dir_parent_is_file", "{tmp}/out is a file, not a folder for the outputs"),
        ("dataset_dir_is_file", "{tmp}/out/shakespeare_char is a file, not a dataset folder"),
        ("name_dotdot", "dataset name '..' must be a plain folder name"),
        ("name_slash", "dataset name 'a/b' must be a plain folder name"),
        ("empty_input", "input file {tmp}/empty.txt is empty"),
        ("one_char", "the train split has 0 tokens, too few to train on at all"),
        ("five_chars", "the val split has 1 tokens, too few to evaluate at all"),
        ("no_match", "no files match --input {tmp}/nothing*.txt"),
        ("later_file_fails", "{tmp}/in/b.txt is not UTF-8 text"),
        ("no_val_drawn", "no document was drawn for val from 1 documents; raise --val-fraction"),
    ],
)
def test_prepare_refusals_are_one_line_and_write_nothing(tmp_path, capsys, case, needle):
    inputs = tmp_path / "in"
    out = tmp_path / "out"
    text = "To be, or not to be, that is the question.\n" * 50
    if case.startswith("latin1"):
        (tmp_path / "latin1.txt").write_bytes("Romeo, cafй Juliet\n".encode("cp1251") * 10)
        argv = ["shakespeare_char" if case == "latin1_char" else "corpus", "--input", tmp_path / "latin1.txt"]
    elif case == "too_many_chars":
        chars = "".join(chr(0x4E00 + i) for i in range(20_000)) + "".join(chr(0x20000 + i) for i in range(50_000))
        (tmp_path / "many.txt").write_text(chars * 2)
        argv = ["shakespeare_char", "--input", tmp_path / "many.txt"]
    elif case.startswith("folder_input"):
        inputs.mkdir()
        argv = ["shakespeare_char" if case.endswith("char") else "corpus", "--input", inputs]
    elif case == "input_loop":
        (tmp_path / "loop.txt").symlink_to(tmp_path / "loop.txt")
        argv = ["corpus", "--input", tmp_path / "loop.txt"]
    elif case == "input_device":
        argv = ["shakespeare", "--input", os.devnull]
    elif case == "int_column":
        argv = ["corpus", "--input", write_parquet(tmp_path / "i.parquet", text=[1, 2], id=[1, 2])]
    elif case == "binary_column":
        argv = ["corpus", "--input", write_parquet(tmp_path / "b.parquet", text=[b"\xff", b"a"])]
    elif case == "corrupt_parquet":
        write_parquet(tmp_path / "good.parquet", text=["a good document"] * 100)
        (tmp_path / "bad.parquet").write_bytes(b"PAR1" + b"\0" * 100 + b"PAR1")
        argv = ["corpus", "--input", f"{tmp_path}/*.parquet"]
    elif case.startswith("threads_") or case in ("val_fraction_nan", "seed_negative"):
        (tmp_path / "t.txt").write_text(text)
        option = {
            "threads_zero": ["--num-threads", "0"],
            "threads_negative": ["--num-threads", "-3"],
            "threads_huge": ["--num-threads", "1000000000"],
            "threads_text": ["--num-threads", "many"],
            "val_fraction_nan": ["--val-fraction", "nan"],
            "seed_negative": ["--seed", "-1"],
        }[case]
        argv = ["corpus", "--input", tmp_path / "t.txt", *option]
    elif case.startswith(("data_dir", "dataset_dir")):
        (tmp_path / "t.txt").write_text(text)
        if case == "dataset_dir_is_file":
            out.mkdir()
            (out / "shakespeare_char").write_text("not a folder")
        else:
            out.write_text("not a folder")
        data_dir = out / "deeper" if case == "data_dir_parent_is_file" else out
        argv = ["shakespeare_char", "--input", tmp_path / "t.txt", "--data-dir", data_dir]
    elif case.startswith("name_"):
        (tmp_path / "t.txt").write_text(text)
        argv = ["shakespeare_char", "--input", tmp_path / "t.txt", "--name", ".." if case == "name_dotdot" else "a/b"]
    elif case == "empty_input":
        (tmp_path / "empty.txt").write_text("")
        argv = ["shakespeare_char", "--input", tmp_path / "empty.txt"]
    elif case in ("one_char", "five_chars"):
        (tmp_path / "t.txt").write_text("a" if case == "one_char" else "abcde")
        argv = ["shakespeare_char", "--input", tmp_path / "t.txt"]
    elif case == "no_match":
        argv = ["corpus", "--input", f"{tmp_path}/nothing*.txt"]
    elif case == "later_file_fails":
        inputs.mkdir()
        (inputs / "a.txt").write_text(text * 20)
        (inputs / "b.txt").write_bytes(b"\xff\xfe binary")
        argv = ["corpus", "--input", f"{inputs}/*.txt", "--val-fraction", "0.5"]
    elif case == "no_val_drawn":
        (tmp_path / "t.txt").write_text(text)
        argv = ["corpus", "--input", tmp_path / "t.txt"]
    if "--data-dir" not in argv:
        argv += ["--data-dir", out / "data"]  # a data dir that does not exist yet: it must not be left behind
    before = tree(tmp_path)
    code, _, err = run_prepare(argv, capsys)
    assert_refused(code, err, needle.format(tmp=tmp_path))
    assert tree(tmp_path) == before


def test_a_failed_prepare_keeps_the_dataset_that_was_there(tmp_path, capsys, shakespeare_path):
    data = tmp_path / "data"
    prepare_shakespeare_char(data, shakespeare_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(shakespeare_path.read_text())
    (tmp_path / "in" / "z.txt").write_bytes(b"\x00\xff")
    before = tree(tmp_path)
    argv = ["shakespeare_char", "--input", tmp_path / "in" / "z.txt", "--data-dir", data]
    assert_refused(*run_prepare(argv, capsys)[::2], "z.txt is not UTF-8 text")
    argv = ["corpus", "--name", "shakespeare_char", "--input", f"{tmp_path}/in/*.txt", "--data-dir", data]
    assert_refused(*run_prepare(argv, capsys)[::2], "z.txt is not UTF-8 text")
    assert tree(tmp_path) == before


def test_failure_mid_stream_leaves_no_temporaries(tmp_path, monkeypatch):
    """Ctrl-C (or any error) while train.bin and val.bin are being streamed: both temporaries go, and so
    does the dataset folder this run made."""
    from raygpt.prep import corpus

    (tmp_path / "a.txt").write_text("line\n" * 5000)
    real = corpus.iter_documents
    seen = []

    def interrupted(*args, **kwargs):
        for batch in real(*args, **kwargs):
            yield batch
            seen.append(sorted(p.name for p in (tmp_path / "data" / "c").iterdir()))
            raise KeyboardInterrupt

    monkeypatch.setattr(corpus, "iter_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus("c", tmp_path / "data", tmp_path / "a.txt", one_doc_per_line=True, val_fraction=0.1)
    assert len(seen[0]) == 2 and all(name.endswith(".tmp") for name in seen[0])  # they did exist
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_ctrl_c_during_prepare_exits_130_and_leaves_nothing(tmp_path, shakespeare_path):
    big = tmp_path / "big.txt"
    big.write_text(shakespeare_path.read_text() * 12)
    data = tmp_path / "data"
    process = subprocess.Popen(
        [sys.executable, "-m", "raygpt.prepare", "c", "--input", big, "--one-doc-per-line", "--data-dir", data],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while len(list(data.glob("c/.*.tmp"))) < 2 and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # into the tokenizing
    assert process.poll() is None, "prepare finished before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == EXIT_INTERRUPTED, err
    assert err.strip().splitlines()[-1].startswith("interrupted") and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt"]


def test_a_small_val_split_is_a_one_line_warning(tmp_path, capsys, shakespeare_path):
    (tmp_path / "small.txt").write_text(shakespeare_path.read_text()[:2000])
    code, out, err = run_prepare(
        ["shakespeare_char", "--input", tmp_path / "small.txt", "--data-dir", tmp_path], capsys
    )
    assert code == 0 and "val 200 tokens" in out
    assert err.startswith("warning: shakespeare_char: the val split has only 200 tokens (under 10,000)")
    assert "\n" not in err and "no block_size of 200 or more can be evaluated" in err
    code, _, err = run_prepare(["shakespeare_char", "--input", shakespeare_path, "--data-dir", tmp_path], capsys)
    assert code == 0 and err == ""  # 111,540 val tokens: no warning


def test_every_output_is_written_atomically(tmp_path, shakespeare_path):
    (tmp_path / "in").mkdir()
    write_parquet(tmp_path / "in" / "a.parquet", text=["the king doth speak"] * 500 + [None])
    dataset = prepare_corpus("owt", tmp_path / "data", f"{tmp_path}/in/*.parquet", val_fraction=0.1)
    assert sorted(p.name for p in dataset.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    meta = json.loads((dataset / "meta.json").read_text())
    assert {key: meta.pop(key) for key in ("vocab_size", "tokenizer", "dtype")} == {
        "vocab_size": 50257,
        "tokenizer": "gpt2",
        "dtype": "uint16",
    }
    # and what object storage checks a copy against: each file's size and sha256
    files = {name: (dataset / name).read_bytes() for name in ("train.bin", "val.bin")}
    assert meta == {
        "files": {
            name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()
        }
    }


def test_prepare_dataset_hints_name_the_callers_flag(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    (tmp_path / "in").mkdir()
    with pytest.raises(PrepareError) as error:
        prepare_dataset("shakespeare_char", tmp_path / "data", tmp_path / "in", input_flag="--prepare-input")
    assert "--prepare-input" in one_line(error.value) and "--input " not in str(error.value)
    with pytest.raises(PrepareError) as error:
        prepare_dataset("corpus", tmp_path / "data", None, input_flag="--prepare-input")
    assert one_line(error.value).startswith("no --prepare-input given")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(PrepareError) as error:
        prepare_dataset("shakespeare", tmp_path / "data", None, input_flag="--prepare-input")
    assert "pass a local copy with --prepare-input FILE" in one_line(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no empty dataset folder left


def test_cli_refusal_in_a_subprocess(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"\xff" * 10)
    result = subprocess.run(
        [sys.executable, "-m", "raygpt.prepare", "corpus", "--input", tmp_path / "t.txt", "--data-dir", tmp_path / "d"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == EXIT_REFUSED and result.stdout == ""
    assert (
        result.stderr.strip()
        == f"error: {tmp_path / 't.txt'} is not UTF-8 text; convert it (e.g. iconv -t utf-8) or leave it out"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


# ---- E. --help --------------------------------------------------------------------------------------


def test_prepare_help_reads_once():
    result = subprocess.run([sys.executable, "-m", "raygpt.prepare", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == ""
    text = result.stdout
    assert text.startswith("usage: python -m raygpt.prepare ")
    assert text.count("Prepare a dataset: text or parquet files") == 1
    assert text.count("python -m raygpt.prepare shakespeare_char [--input input.txt]") == 1
    for option in ("--input", "--data-dir", "--name", "--text-column", "--one-doc-per-line", "--val-fraction"):
        assert f"  {option}" in text
    options = text.split("options:")[1].split("examples:")[0]
    # every option but --help says its default
    assert options.count("(default:") + options.count("default: ") >= 8


# ---- F. the launcher: its options, outputs and resume checkpoints, refused before Ray starts ------------


def launch_refusal(argv, capsys) -> str:
    from raygpt import launch

    code = launch.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_REFUSED and err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.fixture
def launch_args(tmp_path, char_data):
    from conftest import TINY_LOCAL_RUN

    out, storage = tmp_path / "out", tmp_path / "ray"
    return [*TINY_LOCAL_RUN, f"--data_dir={char_data}", f"--out_dir={out}", f"--storage_path={storage}"]


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--address"], "argument --address: expected one argument"),
        (["--prepare-input"], "argument --prepare-input: expected one argument"),
        (["--fresh=yes"], "argument --fresh: ignored explicit argument 'yes'"),
        (["--verbose=1"], "argument --verbose: ignored explicit argument '1'"),
        (["--f"], "unknown config key 'f'"),  # not an abbreviation of --fresh
        (["--add=10.0.0.1:6379"], "unknown config key 'add'"),  # nor of --address
        (["--lerning_rate"], "unknown config key 'lerning_rate' (did you mean 'learning_rate'?)"),
    ],
)
def test_launcher_option_mistakes_are_one_line(capsys, argv, needle):
    assert needle in launch_refusal(argv, capsys)


@pytest.mark.parametrize(
    "address, needle",
    [
        ("garbage", "--address 'garbage' is not a Ray address: use HOST:PORT"),
        (":6379", "--address ':6379' is not a Ray address"),
        ("head:http", "--address 'head:http' is not a Ray address"),
        ("10.0.0.1:70000", "--address '10.0.0.1:70000' is not a Ray address"),
        ("127.0.0.1:{port}", "cannot reach the Ray cluster at 127.0.0.1:{port} (--address): Connection refused"),
        ("ray://127.0.0.1:{port}", "cannot reach the Ray cluster at ray://127.0.0.1:{port} (--address)"),
    ],
)
def test_a_bad_or_unreachable_ray_address_is_refused_at_once(tmp_path, capsys, launch_args, address, needle):
    """ray.init retries an address nobody answers on for minutes, logging all the while."""
    port = closed_port()
    argv = [a for a in launch_args if a != "--local_mode=True"]
    start = time.time()
    err = launch_refusal([*argv, f"--address={address.format(port=port)}"], capsys)
    assert needle.format(port=port) in err and time.time() - start < 20
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither out_dir nor storage_path was left


def test_ray_address_from_the_environment_is_checked_too(tmp_path, capsys, launch_args, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{closed_port()}")
    argv = [a for a in launch_args if a != "--local_mode=True"]
    assert "(RAY_ADDRESS): Connection refused" in launch_refusal(argv, capsys)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--num-workers=3", "--gradient_accumulation_steps=4"], "must be divisible by the number of workers (3)"),
        (["--num-workers=2-3", "--gradient_accumulation_steps=4"], "--num-workers 2-3 includes 3"),
        (["--num-workers=2", "--data_order=nanogpt", "--gradient_accumulation_steps=2"], "needs num_workers=1"),
    ],
)
def test_a_given_worker_count_is_checked_before_ray_starts(tmp_path, capsys, launch_args, extra, needle):
    argv = [a for a in launch_args if a != "--local_mode=True"]
    assert needle in launch_refusal([*argv, *extra], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "init_from, needle",
    [
        ("gpt3", "init_from must be one of scratch, resume, gpt2, gpt2-medium, gpt2-large, gpt2-xl or a local"),
        ("{tmp}/hf", "hf is not a GPT-2 checkpoint folder: it has neither model.safetensors nor pytorch_model.bin"),
        ("{tmp}/short", "short have a 8-token context; block_size 16 is larger"),
    ],
)
def test_a_bad_init_from_is_refused_before_ray_starts(tmp_path, capsys, launch_args, init_from, needle):
    """TrainConfig reads no disk; the launcher checks a GPT-2 folder before anything starts."""
    gpt2_folder(tmp_path / "hf", weights=None)
    gpt2_folder(tmp_path / "short", n_positions=8)
    argv = [a for a in launch_args if a != "--local_mode=True"]  # Ray would start, were it not refused first
    assert needle in launch_refusal([*argv, f"--init_from={init_from.format(tmp=tmp_path)}"], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "short"]


def test_a_relative_gpt2_folder_reaches_the_workers_as_an_absolute_path(tmp_path, launch_args, monkeypatch):
    """Ray's workers run in folders of their own, where ./hf would name nothing: the config they get
    names the folder absolutely (it is saved with the checkpoint)."""
    from safetensors.torch import save_file

    from raygpt import launch
    from raygpt.core.hf import hf_config, hf_weights
    from raygpt.core.model import GPTConfig
    from raygpt.core.tokenizer import GPT2_VOCAB_SIZE

    shape = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, bias=True, vocab_size=GPT2_VOCAB_SIZE)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config(shape)))
    save_file(hf_weights(GPT(GPTConfig(**shape)).state_dict(), shape), tmp_path / "hf" / "model.safetensors")
    monkeypatch.chdir(tmp_path)
    assert launch.main([*launch_args, "--init_from=./hf"]) == 0
    saved = torch.load(tmp_path / "out" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert saved["config"]["init_from"] == str((tmp_path / "hf").resolve())
    assert saved["model_args"]["block_size"] == 16  # GPT-2's context, cropped to the run's block_size


def test_a_refused_launch_leaves_no_folder_or_lock_file_behind(tmp_path, capsys, launch_args):
    err = launch_refusal([*launch_args, "--init_from=resume"], capsys)
    assert "init_from=resume but there is no checkpoint" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    (tmp_path / "ray").mkdir()
    launch_refusal([*launch_args, "--init_from=resume"], capsys)
    assert tree(tmp_path) == {"out": None, "ray": None}  # kept, as they were: empty


# ---- names the OS refuses (ENAMETOOLONG): one line before anything is made ----------------------------

LONG = "n" * 256  # one byte over a file name's 255
LONG_MULTIBYTE = "é" * 128  # 128 characters, but 256 bytes


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--out_dir={tmp}/" + LONG + "/out"], "out_dir: the name 'nnnn"),
        (["--out_dir={tmp}/out/" + LONG_MULTIBYTE], "out_dir: the name 'éééé"),
        (["--data_dir={tmp}/" + LONG], "data_dir: the name 'nnnn"),
        (["--dataset=" + LONG], "dataset: the name 'nnnn"),
        (["--storage_path={tmp}/" + LONG], "storage_path: the name 'nnnn"),
        (["--run_name=" + LONG_MULTIBYTE], "run_name: the name 'éééé"),
        (["--init_from={tmp}/" + LONG], "init_from: the name 'nnnn"),
        (["--out_dir={tmp}/" + "/".join(["d" * 200] * 20)], "out_dir is 4,"),
    ],
)
def test_a_name_too_long_for_the_os_is_one_line_and_leaves_nothing(tmp_path, capsys, launch_args, extra, needle):
    err = launch_refusal([*launch_args, *(arg.format(tmp=tmp_path) for arg in extra)], capsys)
    assert needle in err and "Errno" not in err
    assert tree(tmp_path) == {}


def test_a_relative_out_dir_that_grows_too_long_once_absolute(tmp_path, capsys, launch_args, monkeypatch):
    deep = tmp_path.joinpath(*["w" * 250] * 4)
    deep.mkdir(parents=True)
    before = tree(tmp_path)
    monkeypatch.chdir(deep)
    relative = "/".join(["d" * 200] * 18)  # 3,617 bytes: allowed as given, too long under this folder
    err = launch_refusal([*launch_args, f"--out_dir={relative}"], capsys)
    assert "out_dir is 4," in err and tree(tmp_path) == before


def test_a_run_name_too_long_for_its_lock_file(tmp_path, capsys, launch_args):
    """out_dir's folder name is the run name, and the Ray run's lock file adds to it: refused before any
    lock or folder is made, and the advice works as printed."""
    argv = [*launch_args, f"--out_dir={tmp_path / ('r' * 250)}", "--local_mode=False"]
    err = launch_refusal(argv, capsys)
    assert "is too long for its lock file's name (263 bytes, over the 255" in err and "pass a shorter --run_name" in err
    assert tree(tmp_path) == {}
    assert launch_refusal([*argv, f"--run_name={'r' * 243}"], capsys) and tree(tmp_path) == {}
    from raygpt import launch

    assert launch.main([*argv, "--local_mode=True", "--run_name=short"]) == 0
    assert (tmp_path / ("r" * 250) / "ckpt.pt").is_file()


def test_fresh_refuses_a_name_the_os_would_refuse(tmp_path, capsys, launch_args):
    taken = tmp_path / ("f" * 254)
    taken.mkdir()
    err = launch_refusal([*launch_args, f"--out_dir={taken}", "--run_name=x", "--fresh"], capsys)
    assert "--fresh's out_dir: the name 'ffff" in err and "256 bytes long" in err
    assert tree(tmp_path) == {taken.name: None}


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([LONG, "--data-dir", "{tmp}/data"], "dataset name: the name 'nnnn"),
        (["corpus", "--name", LONG_MULTIBYTE, "--data-dir", "{tmp}/data"], "dataset name: the name 'éééé"),
        (["shakespeare_char", "--data-dir", "{tmp}/data/" + LONG], "--data-dir: the name 'nnnn"),
    ],
)
def test_prepare_refuses_names_the_os_would_refuse(tmp_path, capsys, argv, needle):
    (tmp_path / "corpus.txt").write_text("to be or not to be " * 200)
    before = tree(tmp_path)
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, _, err = run_prepare([*argv, "--input", tmp_path / "corpus.txt"], capsys)
    assert_refused(code, err, needle)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("key", ["out_dir", "storage_path"])
def test_an_output_folder_that_is_a_file(tmp_path, capsys, launch_args, key):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    err = launch_refusal([*launch_args, f"--{key}={blocker}"], capsys)
    assert f"{key} {blocker} is a file, not a folder: pass another --{key}" in err
    assert tree(tmp_path) == {"blocker": b"keep me"}


def tiny_checkpoint(**changes) -> dict:
    """A real checkpoint of TINY_LOCAL_RUN's model (what a run of it saves), with `changes`."""
    from raygpt.core.model import GPT, GPTConfig

    model_args = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, bias=False, vocab_size=65, dropout=0.0)
    model = GPT(GPTConfig(**model_args))
    optimizer = torch.optim.AdamW(model.parameters())
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": model_args,
             "iter_num": 2, "best_val_loss": 4.0, "config": {"dataset": "shakespeare_char"}}  # fmt: skip
    return {**state, **changes}


@pytest.mark.parametrize(
    "damage, needle",
    [
        ("model_text", "'model' must be a dict of tensors, got str"),
        ("model_empty", "model_args n_layer 1, but 'model' holds 0 tensors"),
        (
            "weight_missing",
            "its weights are not those of its model_args (1 missing, e.g. lm_head.weight; 0 unexpected)",
        ),
        ("extra_weight", "(0 missing; 1 unexpected, e.g. junk)"),
        ("wrong_shape", "weight transformer.wte.weight is (3,), but its model_args make it (65, 16)"),
        ("no_optimizer", "'optimizer' must be an optimizer's state_dict (state and param_groups)"),
        ("optimizer_list", "'optimizer' must be an optimizer's state_dict"),
        ("iter_two_numbers", "iter_num must be a number, got Tensor"),
        ("a_billion_layers", "model_args n_layer 1000000000, but 'model' holds 10 tensors"),
        ("pickled_list", "is damaged or truncated and cannot be read (not a torch checkpoint)"),
    ],
)
def test_a_resume_checkpoint_every_worker_would_fail_on_is_refused_first(tmp_path, capsys, launch_args, damage, needle):
    import pickle

    out = tmp_path / "out"
    out.mkdir()
    state = tiny_checkpoint()
    if damage == "model_text":
        state["model"] = "weights"
    elif damage == "model_empty":
        state["model"] = {}
    elif damage == "weight_missing":
        del state["model"]["lm_head.weight"]
    elif damage == "extra_weight":
        state["model"]["junk"] = torch.zeros(1)
    elif damage == "wrong_shape":
        state["model"]["transformer.wte.weight"] = torch.zeros(3)
    elif damage == "no_optimizer":
        del state["optimizer"]
    elif damage == "optimizer_list":
        state["optimizer"] = [1, 2]
    elif damage == "iter_two_numbers":
        state["iter_num"] = torch.tensor([1, 2])
    elif damage == "a_billion_layers":
        state["model_args"]["n_layer"] = 10**9
    if damage == "pickled_list":
        (out / "ckpt.pt").write_bytes(pickle.dumps([1, 2, 3], protocol=4))
    else:
        torch.save(state, out / "ckpt.pt")
    before = tree(tmp_path)
    err = launch_refusal([*launch_args, "--init_from=resume"], capsys)
    assert needle in err and "--fresh starts a new run beside it" in err
    assert tree(tmp_path) == before


def test_a_whole_checkpoint_passes_the_check():
    from raygpt.core.checkpoint import check_resumable

    check_resumable(tiny_checkpoint(), "ckpt.pt")
    compiled = tiny_checkpoint()
    compiled["model"] = {f"_orig_mod.{k}": v for k, v in compiled["model"].items()}  # torch.compile's names
    check_resumable(compiled, "ckpt.pt")


def test_a_discarded_lock_file_is_removed_and_a_replaced_one_is_not_trusted(tmp_path):
    from raygpt.driver.runlock import RunLock

    path = tmp_path / ".raygpt.lock"
    first = RunLock()
    first.acquire(path, "out_dir")
    stale = open(path, "a+")  # another launch opened the file before the first one removed it
    first.discard()
    assert not path.exists()
    second = RunLock()
    second.acquire(path, "out_dir")  # a new file: the stale handle's inode is not the lock any more
    assert path.exists() and second.created == [path]
    second.release()
    assert path.exists()  # release alone keeps it: a rerun's lock file is not removed by a later run
    stale.close()


def test_an_overlong_refusal_is_cut_to_one_readable_line(capsys):
    from raygpt.errors import MAX_LINE, refuse

    assert refuse(RaygptError("cannot read " + "x" * 10_000)) == EXIT_REFUSED
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot read xxx") and err.endswith("(10,012 characters)")
    assert len(err) <= MAX_LINE + len("error: ") and "\n" not in err


UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="drops root's file access with setpriv")
@pytest.mark.parametrize(
    "damage, needle",
    [
        ("train.bin", "cannot read {data}/shakespeare_char/train.bin: Permission denied"),
        ("ckpt.pt", "cannot read {out}/ckpt.pt: Permission denied; --fresh starts a new run"),
        ("out_dir", "out_dir {out} is not writable: pass another --out_dir or change its permissions"),
    ],
)
def test_unreadable_inputs_are_one_line(tmp_path, char_data, damage, needle):
    """chmod 000 / 555 as a user sees it: root without the capabilities that bypass file permissions."""
    from conftest import TINY_LOCAL_RUN

    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(char_data, data)
    out.mkdir()
    if damage == "train.bin":
        (data / "shakespeare_char" / "train.bin").chmod(0)
    elif damage == "ckpt.pt":
        torch.save(tiny_checkpoint(), out / "ckpt.pt")
        (out / "ckpt.pt").chmod(0)
    else:
        out.chmod(0o555)
    argv = [*TINY_LOCAL_RUN, f"--data_dir={data}", f"--out_dir={out}", f"--storage_path={tmp_path / 'ray'}"]
    if damage == "ckpt.pt":
        argv.append("--init_from=resume")
    result = subprocess.run([*UNPRIVILEGED, sys.executable, "-m", "raygpt.launch", *argv],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == EXIT_REFUSED, result.stderr[-2000:]
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and needle.format(data=data, out=out) in err
    assert not (tmp_path / "ray").exists()


def test_gpt2_weights_neither_cached_nor_reachable_are_refused_before_ray_starts(tmp_path, char_data):
    # Each worker would find out after Ray's start (and the run end as a failure); the launcher asks the
    # HF cache, then the hub, first. A subprocess: huggingface_hub reads HF_HUB_OFFLINE when imported.
    from conftest import TINY_LOCAL_RUN

    argv = [a for a in TINY_LOCAL_RUN if a != "--local_mode=True"]
    argv += ["--init_from=gpt2", f"--data_dir={char_data}", f"--out_dir={tmp_path / 'out'}"]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "raygpt.launch", *argv], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert done.returncode == EXIT_REFUSED, done.stdout + done.stderr
    assert done.stderr.startswith("error: cannot get gpt2 weights (OfflineModeIsEnabled)"), done.stderr
    assert done.stderr.count("\n") == 1 and "init_from=/path/to/gpt2" in done.stderr
    assert "Ray" not in done.stdout and not (tmp_path / "out").exists()
