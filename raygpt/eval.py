"""Score a trained GPT: multiple-choice accuracy in HellaSwag's format, or bits per byte of a dataset.

TASK is `hellaswag` (its val split: downloaded once into --cache-dir, or given with --input), a .jsonl file
of the same shape (one object a line: ctx, two or more endings, label), or `bpb` (bits per byte of a
dataset's val.bin; by default the dataset the checkpoint was trained on). The model comes from a
checkpoint (a Ray checkpoint folder, sharded or not, a ckpt.pt, an out_dir, or any of them at an s3://
URI) or from OpenAI's GPT-2 weights, and reads text with its own tokenizer, as raygpt.sample does.
Progress goes to stderr; the result is one line on stdout (a JSON object with --json).

examples:
    python -m raygpt.eval hellaswag --init-from gpt2
    python -m raygpt.eval hellaswag --out-dir out-gpt2 --input hellaswag_val.jsonl --limit 1000
    python -m raygpt.eval my_task.jsonl --checkpoint ~/ray_results/run/checkpoint_2026-... --json
    python -m raygpt.eval bpb --out-dir out-shakespeare-char
    python -m raygpt.eval bpb --init-from gpt2 --data data/shakespeare
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from raygpt import sample
from raygpt.config.schema import HELLASWAG_CACHE, HELLASWAG_FILE
from raygpt.core import evals
from raygpt.core.model import GPT
from raygpt.core.saved_model import (
    checkpoint_file,
    dataset_meta,
    load_checkpoint_model,
    locate_checkpoint,
    tokenizer_for,
)
from raygpt.core.step import Precision
from raygpt.core.tokenizer import Tokenizer, load_meta
from raygpt.errors import EXIT_INTERRUPTED, OneLineParser, one_line, run_cli
from raygpt.prep.hellaswag import HELLASWAG_URL, cached_hellaswag
from raygpt.storage.datasets import Meter, dataset_uri, default_cache_root, stage_dataset
from raygpt.storage.uri import StorageError, is_uri

PROGRESS_INTERVAL_S = 5.0
EvalError = evals.EvalError


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def check_options(args) -> None:
    """Refuse, all in one line, the option values no evaluation can use."""
    problems = []
    if args.limit is not None and args.limit < 1:
        problems.append(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        problems.append(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.input and args.task != "hellaswag":
        problems.append("--input is hellaswag's local copy; give another jsonl file as the task itself")
    if args.data and args.task != "bpb":
        problems.append("--data is the dataset bpb scores")
    if args.init_from != "resume" and (args.checkpoint or args.meta):
        problems.append("--checkpoint and --meta are for --init-from resume (GPT-2 weights read GPT-2 BPE)")
    if problems:
        raise EvalError("; ".join(problems))


# ---- the model --------------------------------------------------------------------------------------


def load_model(args, with_dataset: bool = False) -> tuple[GPT, Tokenizer, Path | None]:
    """The model and the tokenizer it was trained with, found as raygpt.sample finds them, and (with_dataset:
    bpb) the local folder of the dataset to score, whose meta.json is the tokenizer's where --data names it."""
    if args.init_from != "resume":  # GPT-2 weights read GPT-2 BPE
        model, tokenizer = sample.load_model(args)
        folder = dataset_folder(args, {}) if with_dataset else None
        meta = load_meta(folder) if folder else None
        if meta and meta["tokenizer"] != "gpt2":
            raise EvalError(f"{folder} holds a {meta['tokenizer']} dataset, but GPT-2's weights read GPT-2 BPE tokens")
        return model, tokenizer, folder
    location = locate_checkpoint(args.checkpoint or args.out_dir, say)
    model, config, trained_on = load_checkpoint_model(checkpoint_file(location))
    folder = dataset_folder(args, config) if with_dataset else None
    meta_option = args.meta or (meta_folder(folder) if args.data else None)
    tokenizer = tokenizer_for(model.config.vocab_size, *dataset_meta(config, meta_option), trained_on)
    return model, tokenizer, folder


# ---- multiple choice --------------------------------------------------------------------------------


def task_file(args) -> Path:
    """The jsonl to score: the task's own path, --input, or HellaSwag's val split in the cache (downloaded
    the first time)."""
    if args.task != "hellaswag":
        path = Path(args.task).expanduser()
        if not path.exists():
            raise EvalError(f"no file {path}: TASK is hellaswag, bpb or a jsonl file in HellaSwag's format")
        return path
    if args.input:
        return Path(args.input).expanduser()
    return cached_hellaswag(args.cache_dir, "--input FILE", HELLASWAG_URL)


def score_multiple_choice(args, model: GPT, tokenizer: Tokenizer, examples: list[evals.Example]) -> dict:
    name = "hellaswag" if args.task == "hellaswag" else Path(args.task).name
    encoded = evals.encode_examples(examples, tokenizer, model.config.block_size, model.config.vocab_size)
    truncated = sum(example.truncated for example in encoded)
    if truncated:
        say(
            f"note: {truncated:,} of {len(encoded):,} examples do not fit the model's block_size "
            f"{model.config.block_size} with every ending: their contexts are truncated from the left (each "
            "ending and the context's last tokens are kept), as lm-eval-harness does"
        )
    n_rows = sum(len(example.rows) for example in encoded)
    say(f"{name}: scoring {len(encoded):,} examples ({n_rows:,} endings) on {args.device} ({args.precision})")
    meter = progress_meter(n_rows, name, "endings")
    losses = evals.ending_losses(model, encoded, args.dtype, args.batch_size, meter.add)
    result = {"task": name, **evals.choice_metrics(encoded, losses), "seconds": round(meter.seconds(), 2)}
    result["line"] = (
        f"{name}: acc {result['acc']:.4f} ({result['correct']}/{result['examples']}), acc_norm "
        f"{result['acc_norm']:.4f} ({result['correct_norm']}/{result['examples']}) in {result['seconds']:.1f} s"
    )
    return result


def progress_meter(total: int, name: str, units: str) -> Meter:
    def line(meter: Meter) -> str:
        return f"{name}: {meter.done:,}/{meter.total:,} {units} ({meter.rate():,.0f}/s, {meter.eta():,.0f} s left)"

    return Meter(total, line, say, PROGRESS_INTERVAL_S)


# ---- bits per byte ----------------------------------------------------------------------------------


def dataset_folder(args, config: dict) -> Path:
    """The local folder of the dataset bpb scores: --data, else the one the checkpoint was trained on; one
    at a URI is staged into the node's dataset cache first, as training stages it."""
    location = args.data
    if not location:
        if not config.get("dataset"):
            trained = "GPT-2's weights name" if args.init_from != "resume" else "the checkpoint's config names"
            raise EvalError(f"{trained} no dataset: pass the one to score with --data DIR (it holds val.bin)")
        data_dir = str(config.get("data_dir") or "data")
        location = dataset_uri(data_dir, config["dataset"]) if is_uri(data_dir) else f"{data_dir}/{config['dataset']}"
    if is_uri(location):
        try:
            return stage_dataset(location, default_cache_root(), progress=say)
        except StorageError as e:
            raise EvalError(str(e)) from None
    return Path(location).expanduser()


def read_val_tokens(folder: Path) -> np.ndarray:
    path = folder / "val.bin"
    if not path.is_file():
        raise EvalError(f"{path} not found: bpb scores a prepared dataset's val split (python -m raygpt.prepare)")
    if path.stat().st_size % 2:
        raise EvalError(f"{path} has an odd number of bytes: not a uint16 token file")
    try:
        return np.memmap(path, dtype=np.uint16, mode="r")
    except (OSError, ValueError) as e:  # unreadable, or empty (numpy cannot map 0 bytes)
        raise EvalError(f"cannot read {path}: {getattr(e, 'strerror', None) or one_line(str(e))}") from None


def score_bpb(args, model: GPT, tokenizer: Tokenizer, folder: Path) -> dict:
    tokens = read_val_tokens(folder)
    block_size = model.config.block_size
    windows = len(evals.bpb_windows(len(tokens), block_size, args.limit))
    say(
        f"bpb: scoring {folder}/val.bin ({len(tokens):,} tokens, windows of {block_size}) on {args.device} "
        f"({args.precision})"
    )
    meter = progress_meter(windows, "bpb", "windows")
    byte_lengths = evals.token_byte_lengths(tokenizer, model.config.vocab_size)
    try:
        result = evals.bits_per_byte(model, tokens, byte_lengths, args.dtype, args.batch_size, args.limit, meter.add)
    except EvalError as e:
        raise EvalError(f"{folder}/val.bin: {e}") from None
    result = {"task": "bpb", "data": str(folder), **result, "seconds": round(meter.seconds(), 2)}
    result["line"] = (
        f"bpb: {result['bits_per_byte']:.4f} bits per byte over {result['tokens']:,} tokens ({result['bytes']:,} "
        f"bytes) of {folder}/val.bin, loss {result['loss']:.4f}, in {result['seconds']:.1f} s"
    )
    return result


def meta_folder(folder: Path) -> str | None:
    """folder, where it holds a meta.json or meta.pkl: the vocabulary of the tokens bpb reads."""
    return str(folder) if any((folder / name).is_file() for name in ("meta.json", "meta.pkl")) else None


# ---- the command ------------------------------------------------------------------------------------


def evaluate(args) -> int:
    """Print the result; what cannot run is refused (a RaygptError), cheap checks before the model loads."""
    check_options(args)
    device = sample.device_for(args.device)
    args.precision = Precision(args.dtype, device).dtype  # a dtype the device lacks is refused here
    if args.task == "bpb":
        model, tokenizer, folder = load_model(args, with_dataset=True)
        result = score_bpb(args, model.eval().to(device), tokenizer, folder)
    else:
        examples = evals.read_examples(task_file(args), args.limit)  # a malformed file before a large model loads
        model, tokenizer, _ = load_model(args)
        result = score_multiple_choice(args, model.eval().to(device), tokenizer, examples)
    line = result.pop("line")
    print(json.dumps(result) if args.json else line, flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    *about, examples = __doc__.strip().split("\n\n")
    parser = OneLineParser(
        prog="python -m raygpt.eval",
        usage="%(prog)s {hellaswag,FILE.jsonl,bpb} [--out-dir DIR | --checkpoint PATH | --init-from gpt2] [options]",
        description="\n\n".join(about),
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("task", metavar="TASK", help="hellaswag, a jsonl file in HellaSwag's format, or bpb")
    add_model_options(parser)
    parser.add_argument("--input", metavar="FILE", help=f"hellaswag: a local copy of {HELLASWAG_FILE} (no download)")
    parser.add_argument(
        "--cache-dir",
        default=HELLASWAG_CACHE,
        metavar="DIR",
        help="hellaswag: where its val split is downloaded once (default: %(default)s)",
    )
    parser.add_argument(
        "--data",
        metavar="PATH",
        help="bpb: the dataset folder (or URI) whose val.bin to score (default: the checkpoint's data_dir/dataset)",
    )
    parser.add_argument(
        "--limit", type=int, metavar="N", help="score the first N examples (bpb: windows) only (default: all)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=evals.DEFAULT_BATCH_SIZE,
        metavar="N",
        help="sequences (endings, or windows) per forward pass (default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda, cuda:N or mps (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="precision of the forward pass; auto is bfloat16 on GPUs that have it, else float16 on CUDA, "
        "float32 on CPU (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Which model to score: raygpt.sample's options, with its defaults."""
    parser.add_argument(
        "--init-from",
        default="resume",
        metavar="MODEL",
        help="'resume' (the checkpoint of --checkpoint or --out-dir), or GPT-2 weights: gpt2, gpt2-medium, "
        "gpt2-large, gpt2-xl or a local folder of them (default: %(default)s)",
    )
    parser.add_argument(
        "--out-dir",
        default="out",
        metavar="DIR",
        help="a training run's out_dir, holding ckpt.pt (default: %(default)s)",
    )
    parser.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="a Ray checkpoint folder (checkpoint_*, sharded too), a ckpt.pt or an out_dir, local or at a URI; "
        "wins over --out-dir",
    )
    parser.add_argument(
        "--meta",
        metavar="PATH",
        help="the dataset's meta.json (or meta.pkl), or its folder: the model's tokenizer (default: the one in "
        "the checkpoint's data_dir/dataset, or bpb's --data; without one, GPT-2 BPE for GPT-2's vocabulary)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run_cli(lambda: evaluate(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
