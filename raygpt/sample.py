"""Sample text from a trained GPT, as nanoGPT's sample.py does.

The model comes from a checkpoint (a Ray checkpoint folder, a ckpt.pt, or a
training run's out_dir) or from OpenAI's GPT-2 weights. Each of --num-samples
continuations of the prompt is printed whole, then a line of dashes. Text is
encoded and decoded as the model was trained: with the character table of the
dataset's meta.json (or nanoGPT's meta.pkl), or with GPT-2 BPE for a model of
GPT-2's vocabulary. stderr says, before the first text, how many threads torch
computes with on a CPU (one per core no other process keeps busy; --threads N to
choose), and after each text how long it took: stdout holds the texts alone.

examples:
    python -m raygpt.sample --out-dir out-shakespeare-char --start "ROMEO:" --num-samples 3
    python -m raygpt.sample --checkpoint ~/ray_results/run/checkpoint_2026-... --start FILE:prompt.txt
    python -m raygpt.sample --checkpoint ckpt.pt --meta data/shakespeare_char/meta.json --temperature 0
    python -m raygpt.sample --init-from gpt2 --start "Hello, I'm a language model," --top-k 0
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from raygpt.config.schema import SEED_LIMIT
from raygpt.core.model import GPT
from raygpt.core.parallel import choose_cpu_threads, compile_notices, torch_threads
from raygpt.core.saved_model import (
    checkpoint_file,
    dataset_meta,
    load_checkpoint_model,
    locate_checkpoint,
    tokenizer_for,
)
from raygpt.core.step import Precision
from raygpt.core.tokenizer import Tokenizer
from raygpt.errors import EXIT_INTERRUPTED, OneLineParser, RaygptError, one_line, run_cli
from raygpt.storage.files import NulCharacterError, decode_text


class SampleError(RaygptError, ValueError):
    """A sampling request that cannot run as given; the message is one line."""


def check_options(args) -> None:
    """Refuse, all in one line, the option values no sampling can use."""
    problems = []
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        problems.append(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    if args.top_k < 0:
        problems.append(f"--top-k must be 0 (no filtering) or more, got {args.top_k}")
    if args.num_samples < 1:
        problems.append(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads must be at least 1, got {args.threads}")
    if not 0 <= args.seed < SEED_LIMIT:  # training's range; torch.manual_seed fails past 2**64
        problems.append(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.init_from != "resume" and (args.checkpoint or args.meta):
        problems.append("--checkpoint and --meta are for --init-from resume (GPT-2 weights decode with GPT-2 BPE)")
    if problems:
        raise SampleError("; ".join(problems))


def device_for(name: str) -> torch.device:
    """The torch device --device names, if this machine has it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SampleError(f"--device {name!r} is not a device name: use cpu, cuda, cuda:N or mps") from None
    counts = {"cpu": lambda: 1, "cuda": torch.cuda.device_count, "mps": lambda: int(torch.backends.mps.is_available())}
    if device.type not in counts:
        raise SampleError(f"--device {name}: raygpt.sample runs on cpu, cuda (cuda:N) or mps")
    count = counts[device.type]()
    if count == 0:
        built_without = (
            " (this PyTorch was built without CUDA)" if device.type == "cuda" and not torch.version.cuda else ""
        )
        raise SampleError(f"--device {name}: this machine has no {device.type} device{built_without}; use --device cpu")
    if device.index is not None and device.index >= count:
        raise SampleError(f"--device {name}: this machine has {count} {device.type} device(s), numbered from 0")
    return device


def load_model(args) -> tuple[GPT, Tokenizer]:
    """The model and its tokenizer, from a Ray checkpoint folder, a ckpt.pt, an out_dir, or GPT-2 weights."""
    if args.init_from != "resume":
        try:
            return GPT.from_pretrained(args.init_from, dict(dropout=0.0)), Tokenizer.from_meta(None)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise SampleError(f"--init-from {args.init_from}: {one_line(str(e)) or type(e).__name__}") from None
    location = locate_checkpoint(args.checkpoint or args.out_dir, say=lambda line: print(line, file=sys.stderr))
    model, config, trained_on = load_checkpoint_model(checkpoint_file(location))
    return model, tokenizer_for(model.config.vocab_size, *dataset_meta(config, args.meta), trained_on)


def prompt_ids(start: str, tokenizer: Tokenizer) -> list[int]:
    """--start (or the file it names) as token ids."""
    if start.startswith("FILE:"):
        start = read_prompt_file(start[5:])
    else:
        try:
            start.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes the shell passed that are not UTF-8 arrive as lone surrogates
            raise SampleError(f"--start is not UTF-8 text (character {e.start}); give it as UTF-8") from None
    try:
        ids = tokenizer.encode(start)
    except ValueError as e:
        raise SampleError(f"the prompt has {e}") from None
    if not ids:
        raise SampleError("the prompt is empty after tokenization: give some text with --start")
    return ids


def read_prompt_file(name: str) -> str:
    """The text of --start FILE:name: UTF-8 (a leading byte order mark dropped), with no NUL characters,
    which UTF-16 and binary files hold and no tokenizer table has."""
    if not name:
        raise SampleError("--start FILE: names no file: write --start FILE:path/to/prompt.txt")
    path = Path(name).expanduser()
    try:
        return decode_text(path.read_bytes())
    except UnicodeDecodeError:
        raise SampleError(f"the prompt file {path} is not UTF-8 text") from None
    except NulCharacterError:
        raise SampleError(
            f"the prompt file {path} holds NUL characters: it is binary or UTF-16, not UTF-8 text"
        ) from None
    except OSError as e:
        raise SampleError(f"cannot read the prompt file {path}: {e.strerror}") from None


def decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The text of ids. A model whose GPT-2 vocabulary is padded to 50304 may pick a padding id (a trained
    one practically never does); no tokenizer has text for it, so it shows as U+FFFD."""
    text, run = [], []
    for i in ids:
        if i < tokenizer.vocab_size:
            run.append(i)
        else:
            text += [tokenizer.decode(run), "\ufffd"]
            run = []
    return "".join(text) + tokenizer.decode(run)


def generate_options(temperature: float, top_k: int) -> dict:
    """model.generate's temperature and top_k for the command line's, where 0 means greedy / no filtering."""
    if temperature == 0:
        # Greedy decoding: only the most likely token keeps a probability, so sampling always picks it.
        return dict(temperature=1.0, top_k=1)
    return dict(temperature=temperature, top_k=top_k or None)


def sample(args) -> int:
    """Print the texts; what cannot run is refused (a RaygptError) before the model is loaded, where it can be."""
    check_options(args)
    device = device_for(args.device)
    precision = Precision(args.dtype, device)  # a dtype the device lacks is a one-line PrecisionError
    model, tokenizer = load_model(args)
    x = torch.tensor(prompt_ids(args.start, tokenizer), dtype=torch.long, device=device)[None, ...]
    threads = torch.get_num_threads()
    if device.type == "cpu" or args.threads:
        choice = choose_cpu_threads(args.threads)
        progress(choice.describe())
        threads = choice.threads
    torch.manual_seed(args.seed)
    model.eval().to(device)
    if args.compile:
        progress("\n".join(compile_notices("default", device.type, skip="leave out --compile")))
        model = torch.compile(model)
    options = generate_options(args.temperature, args.top_k)
    with torch_threads(threads), torch.no_grad(), precision.autocast():
        for i in range(args.num_samples):
            started = time.perf_counter()
            # A prompt longer than block_size is fine: generate conditions on its last block_size tokens.
            y = generate(model, x, args, options, precision.dtype)
            seconds = time.perf_counter() - started
            progress(
                f"sample {i + 1}/{args.num_samples}: {args.max_new_tokens:,} tokens in {seconds:.1f} s "
                f"({args.max_new_tokens / seconds:,.1f} tokens/s)"
            )
            print(decode(tokenizer, y[0].tolist()))
            print("---------------", flush=True)
    return 0


def progress(line: str) -> None:
    """What sampling says about itself: to stderr, so that stdout holds the texts alone."""
    print(line, file=sys.stderr, flush=True)


def generate(model: GPT, x: torch.Tensor, args, options: dict, dtype: str) -> torch.Tensor:
    """model.generate; weights are finite (load_checkpoint_model checked), so probabilities that are not can
    only come from scores divided by a temperature so small that they overflow the precision."""
    try:
        return model.generate(x, args.max_new_tokens, **options)
    except RuntimeError as e:
        if "probability tensor contains" not in str(e):
            raise
        raise SampleError(
            f"--temperature {args.temperature}: the model's scores divided by it overflow {dtype}; "
            "use a larger temperature, or 0 for greedy decoding"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    *about, examples = __doc__.strip().split("\n\n")
    parser = OneLineParser(
        prog="python -m raygpt.sample",
        usage="%(prog)s [--out-dir DIR | --checkpoint PATH | --init-from gpt2] [--start TEXT] [options]",
        description="\n\n".join(about),
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--init-from",
        default="resume",
        metavar="MODEL",
        help="'resume' (the checkpoint of --checkpoint or --out-dir), or GPT-2 weights: gpt2, gpt2-medium, "
        "gpt2-large, gpt2-xl (from the Hugging Face hub) or a local folder of them (default: %(default)s)",
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
        help="a Ray checkpoint folder (checkpoint_*), a ckpt.pt or an out_dir; wins over --out-dir "
        "(default: --out-dir's ckpt.pt)",
    )
    parser.add_argument(
        "--meta",
        metavar="PATH",
        help="the dataset's meta.json (or nanoGPT's meta.pkl), or its folder: how to encode and decode text "
        "(default: the one in the checkpoint's data_dir/dataset; without one, GPT-2 BPE for a model of GPT-2's "
        "vocabulary)",
    )
    add_generation_options(parser)
    return parser


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """What to generate and how: the prompt, the sampling, the device."""
    parser.add_argument(
        "--start",
        default="\n",
        metavar="TEXT",
        help="the prompt, or FILE:path to read it from a UTF-8 file (default: %(default)r)",
    )
    parser.add_argument(
        "--num-samples", type=int, default=10, metavar="N", help="how many texts to generate (default: %(default)s)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=500, metavar="N", help="tokens generated per text (default: %(default)s)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        metavar="T",
        help="below 1 less random, above 1 more random, 0 always the most likely token (default: %(default)s)",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=200,
        metavar="K",
        help="sample only from the K most likely tokens; 0 from all of them (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=1337,
        metavar="N",
        help="random seed: the same seed gives the same texts (default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda, cuda:N or mps (default: %(default)s, as a GPU is "
        f"{'visible' if torch.cuda.is_available() else 'not visible'} here)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="precision of the forward pass; auto is bfloat16 on GPUs that have it, else float16 on CUDA, "
        "float32 on CPU (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for torch (default: one per core that no other process keeps busy; stderr's first "
        "line says how many)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model first: slower start, faster tokens (default: off)",
    )


def nanogpt_spelling(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """nanoGPT's sample.py spells its options --num_samples=3 and --compile=True; take those as
    --num-samples=3 and --compile (or nothing, for --compile=False), so its commands work here as typed."""
    known = {option for action in parser._actions for option in action.option_strings}
    spelled = []
    for arg in argv:
        name, equals, value = arg.partition("=")
        hyphenated = name.replace("_", "-")
        if arg.startswith("--") and name not in known and hyphenated in known:
            name = hyphenated
        if name == "--compile" and equals:  # a flag here: --compile=True is --compile
            if value.lower() in ("true", "1"):
                spelled.append(name)
            elif value.lower() not in ("false", "0"):
                spelled.append(arg)  # let argparse refuse it
            continue
        spelled.append(name + equals + value)
    return spelled


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(nanogpt_spelling(sys.argv[1:] if argv is None else argv, parser))
    try:
        return run_cli(lambda: sample(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
