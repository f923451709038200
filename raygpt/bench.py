"""`python -m raygpt.bench [CONFIG_FILE] [--key=value ...]`: tokens/s and MFU of one training step.

Runs raygpt's own training step (step.TrainStep, what train_loop_per_worker runs) on one device,
without Ray, on random tokens, after warm-up (and compile), and prints a short table. The model's
vocabulary is the config's dataset's (its meta.json), as in training. On a CPU the first line says how
many threads torch computes with (core.parallel.cpu_threads: one per core no other process keeps busy;
`--threads N` to choose). Progress goes to stderr: the compile as it starts, then a step's time every
few seconds. `--profile DIR` also writes a torch profiler trace of a few steps (open it in Perfetto or
chrome://tracing).

    python -m raygpt.bench configs/train_gpt2.py --batch_size=16 --gradient_accumulation_steps=1
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from raygpt.config.cli import read_config
from raygpt.core.data import Batches
from raygpt.core.memory import check_fits
from raygpt.core.model import GPT, GPTConfig
from raygpt.core.parallel import (
    choose_cpu_threads,
    compile_mode_for,
    compile_notices,
    setup_device,
    torch_threads,
    wrap_model,
)
from raygpt.core.step import NonFiniteGuard, Precision, TrainStep
from raygpt.core.tokenizer import GPT2_VOCAB_SIZE, MAX_VOCAB_SIZE, load_meta, scratch_vocab_size
from raygpt.errors import OneLineParser, RaygptError, refuse

RANDOM_TOKENS = 2_000_000  # of each split: what the batches are drawn from
PROGRESS_EVERY_S = 5.0  # at most one progress line this often, after the first step's


def parse_args(argv: list[str]):
    parser = OneLineParser(
        prog="python -m raygpt.bench",
        usage="%(prog)s [CONFIG_FILE] [--key=value ...] [--steps N] [--warmup N] [--threads N] [--vocab-size V] "
        "[--profile DIR]",
        description="Tokens/s, MFU and peak memory of raygpt's training step on one device, on random tokens. "
        "CONFIG_FILE and --key=value are read as by raygpt.launch.",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps after warm-up (default: %(default)s)")
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed steps first; compile happens here (default: %(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for torch (default: one per core that no other process keeps busy; the first line "
        "says how many)",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="model vocabulary (default: the dataset's meta.json, else GPT-2's padded to 50304)",
    )
    parser.add_argument("--profile", metavar="DIR", help="also write a torch profiler trace of 5 steps to DIR")
    return parser.parse_known_args(argv)


def dataset_vocab_size(cfg) -> int:
    """The vocabulary of the config's dataset, as training would build the model (a bad meta.json is refused)."""
    dataset_dir = Path(cfg.data_dir) / cfg.dataset
    meta = load_meta(dataset_dir) if dataset_dir.is_dir() else None
    return scratch_vocab_size(meta)


def check_args(args) -> None:
    """Refuse, before anything is built, what cannot be benchmarked: the sizes of the run, the profile's folder."""
    if args.steps < 1 or args.warmup < 0:
        raise RaygptError(f"--steps must be at least 1 and --warmup at least 0, got {args.steps}, {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise RaygptError(f"--threads must be at least 1, got {args.threads}")
    if args.vocab_size is not None and not 1 <= args.vocab_size <= MAX_VOCAB_SIZE:
        raise RaygptError(
            f"--vocab-size must be from 1 to {MAX_VOCAB_SIZE:,} (token ids are uint16), got {args.vocab_size}"
        )
    if args.profile is not None:
        profile = Path(args.profile).expanduser()
        if not args.profile or (profile.exists() and not profile.is_dir()):
            raise RaygptError(f"--profile {args.profile!r} must name a folder for the trace")
        parent = next(p for p in profile.parents if p.exists())  # the first one that exists: '.' or '/' at last
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise RaygptError(f"--profile {profile}: {parent} is not a writable folder")


def main(argv: list[str] | None = None) -> int:
    args, config_argv = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg, _ = read_config(config_argv)
        check_args(args)
        vocab_size = dataset_vocab_size(cfg) if args.vocab_size is None else args.vocab_size
    except RaygptError as e:
        return refuse(e)
    use_cuda = cfg.device == "cuda" and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    setup_device(cfg, device)
    model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                      vocab_size=vocab_size)  # fmt: skip
    try:
        precision = Precision(cfg.dtype, device)
        if cfg.check_memory:  # as training does: an absurd size is refused before it is allocated
            check_fits(model_args, cfg.batch_size, precision.dtype, device)
    except RaygptError as e:
        return refuse(e)
    threads = torch.get_num_threads()
    if not use_cuda or args.threads:
        choice = choose_cpu_threads(args.threads)
        print(choice.describe(), flush=True)
        threads = choice.threads
    with torch_threads(threads):
        model, times = bench(cfg, args, model_args, precision)
    print_table(cfg, model, precision.dtype, statistics.median(times), device)
    return 0


def bench(cfg, args, model_args: dict, precision: Precision) -> tuple[GPT, list[float]]:
    """The model of model_args, and the seconds of each timed step (the profile too, with --profile)."""
    device = precision.device
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(**model_args, bias=cfg.bias, dropout=cfg.dropout)).to(device)
    optimizer = model.configure_optimizers(
        cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type, verbose=False
    )
    wrapped = wrap_model(model, cfg, world_size=1, device=device, dtype=precision.dtype)
    use_cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as data_dir:
        # Random tokens: the step's speed does not depend on what the tokens say.
        rng = np.random.default_rng(0)
        for split in ("train", "val"):
            count = max(RANDOM_TOKENS, cfg.block_size + 1)  # a longer block_size still has one batch
            tokens = rng.integers(0, min(model_args["vocab_size"], GPT2_VOCAB_SIZE), count, dtype=np.uint16)
            tokens.tofile(Path(data_dir) / f"{split}.bin")
        batches = Batches(data_dir, cfg.block_size, cfg.batch_size, cfg.seed, device=device)
        guard = NonFiniteGuard(cfg.max_nonfinite_steps, device, announce=False)
        step = TrainStep(wrapped, optimizer, precision, batches, cfg.gradient_accumulation_steps, cfg.grad_clip, guard)
        if cfg.compile:
            progress("\n".join(compile_notices(cfg.compile_mode, device.type)))
        times = time_steps(step, batches, args.warmup, args.steps, use_cuda)
        if args.profile:
            write_profile(step, batches, Path(args.profile), use_cuda)
    return model, times


def progress(line: str) -> None:
    """A progress line: to stderr, so that stdout holds the results alone."""
    print(line, file=sys.stderr, flush=True)


def time_steps(step: TrainStep, batches: Batches, warmup: int, steps: int, use_cuda: bool) -> list[float]:
    """Seconds per step, each step synchronized, after `warmup` untimed steps. Says how the steps go: the
    first of each kind (the first warm-up step compiles), then at most one line every PROGRESS_EVERY_S."""
    sync = torch.cuda.synchronize if use_cuda else (lambda: None)
    X, Y = batches.train_batch(0, 0)
    times, said = [], 0.0
    for it in range(warmup + steps):
        if it == warmup:
            sync()
            if use_cuda:
                torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        _, _, X, Y = step(X, Y, it)
        sync()
        t1 = time.perf_counter()
        timed = it >= warmup
        if timed:
            times.append(t1 - t0)
        if it in (0, warmup) or t1 - said >= PROGRESS_EVERY_S:
            kind, number, total = ("step", it - warmup + 1, steps) if timed else ("warm-up step", it + 1, warmup)
            seconds = t1 - t0
            progress(
                f"{kind} {number}/{total}: " + (f"{seconds:,.1f} s" if seconds >= 10 else f"{seconds * 1000:,.1f} ms")
            )
            said = t1
    return times


def write_profile(step: TrainStep, batches: Batches, directory: Path, use_cuda: bool) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
    X, Y = batches.train_batch(0, 0)
    with profile(activities=activities) as prof:
        for it in range(5):
            _, _, X, Y = step(X, Y, it)
        if use_cuda:
            torch.cuda.synchronize()
    directory.mkdir(parents=True, exist_ok=True)
    trace = directory / "trace.json"
    prof.export_chrome_trace(str(trace))
    print(prof.key_averages().table(sort_by="cuda_time_total" if use_cuda else "cpu_time_total", row_limit=15))
    print(f"trace: {trace}")


def print_table(cfg, model: GPT, dtype: str, dt: float, device: torch.device) -> None:
    tokens = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    mfu = model.estimate_mfu(cfg.batch_size * cfg.gradient_accumulation_steps, dt, device)
    use_cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if use_cuda else "cpu"
    peak_mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if use_cuda else "n/a"
    compiled = compile_mode_for(cfg.compile_mode, device.type)[0] if cfg.compile else "off"  # the mode it ran
    print(
        "| device | params | micro-batch x accum | block | dtype | compile | attention | ms/step | tokens/s | MFU |"
        " peak mem |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {name} | {model.get_num_params() / 1e6:.2f}M | {cfg.batch_size} x {cfg.gradient_accumulation_steps} | "
        f"{cfg.block_size} | {dtype} | {compiled} | {cfg.attention} | {dt * 1000:.2f} | {tokens / dt:,.0f} | "
        f"{'n/a' if mfu is None else f'{mfu * 100:.1f}%'} | {peak_mem} |"
    )


if __name__ == "__main__":
    sys.exit(main())
