"""Where an iteration's time goes under DDP or FSDP2: raygpt's training step on N local GPUs, without Ray.

    python benchmarks/parallel_profile.py --gpus 2 --out /tmp/prof -- --parallelism=fsdp \
        --n_layer=48 --n_head=25 --n_embd=1600 --block_size=1024 --batch_size=8 \
        --gradient_accumulation_steps=2 --dtype=bfloat16 --compile=True

Everything after `--` is read as raygpt.launch reads a config (a config file and --key=value). Each
process builds the model, wrap_model (compile, then DDP or FSDP2) and step.TrainStep exactly as
train_loop_per_worker does, on random tokens; rank 0 prints the median step time (each step
synchronized), the peak memory, and for a few profiled steps the busy fraction of each GPU stream (the
union of its kernels' intervals over the profiled wall time) and the ops with the most GPU time. The
chrome trace goes to --out. `--device cpu --gpus 2` runs the same on CPU with gloo (a self-check).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raygpt.config.cli import read_config
from raygpt.core.data import Batches
from raygpt.core.model import GPT, GPTConfig
from raygpt.core.parallel import enable_tf32, wrap_model
from raygpt.core.step import NonFiniteGuard, Precision, TrainStep

VOCAB = 50304


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_busy(trace_path: Path) -> dict[str, float]:
    """Per GPU stream of the trace: the fraction of the profiled span covered by its kernels."""
    events = json.loads(trace_path.read_text())["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        return {}
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e["dur"] for e in kernels)
    busy: dict[str, float] = {}
    for stream in {e.get("tid") for e in kernels}:
        intervals = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels if e.get("tid") == stream)
        covered, reach = 0.0, start
        for lo, hi in intervals:
            if hi > reach:
                covered += hi - max(lo, reach)
                reach = hi
        busy[f"stream {stream}"] = covered / (end - start)
    return busy


def worker(rank: int, world_size: int, port: int, args, config_argv: list[str]) -> None:
    use_cuda = args.device == "cuda"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    device = torch.device(f"cuda:{rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        enable_tf32()
    cfg, _ = read_config([*config_argv, f"--device={args.device}"])
    if args.optimize_ddp is not None:  # how torch.compile meets DDP (torch's default: ddp_optimizer)
        torch._dynamo.config.optimize_ddp = args.optimize_ddp
    precision = Precision(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size)
    model = GPT(GPTConfig(**model_args, bias=cfg.bias, vocab_size=VOCAB, dropout=cfg.dropout)).to(device)
    wrapped = wrap_model(model, cfg, world_size, device, precision.dtype)
    optimizer = model.configure_optimizers(cfg.weight_decay, 1e-4, (cfg.beta1, cfg.beta2), device.type, False)
    accum = max(1, cfg.gradient_accumulation_steps // world_size)
    data_dir = Path(args.out) / "data"
    batches = Batches(data_dir, cfg.block_size, cfg.batch_size, cfg.seed, rank, world_size, device, accum)
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, device, announce=False)
    step = TrainStep(wrapped, optimizer, precision, batches, accum, cfg.grad_clip, guard)
    sync = torch.cuda.synchronize if use_cuda else (lambda: None)
    X, Y = batches.train_batch(0, 0)
    started = time.perf_counter()
    for it in range(args.warmup):
        _, _, X, Y = step(X, Y, it)
        if it == 0:
            sync()
            first_step_s = time.perf_counter() - started
    sync()
    warmup_s = time.perf_counter() - started
    times = []
    for it in range(args.warmup, args.warmup + args.steps):
        t0 = time.perf_counter()
        _, _, X, Y = step(X, Y, it)
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if use_cuda else float("nan")
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
    first = args.warmup + args.steps
    with profile(activities=activities) as prof:
        for it in range(first, first + args.profile_steps):
            _, _, X, Y = step(X, Y, it)
        sync()
    if rank == 0:
        trace = Path(args.out) / f"trace-{cfg.parallelism}-{cfg.batch_size}.json"
        prof.export_chrome_trace(str(trace))
        median = statistics.median(times)
        tokens = cfg.batch_size * cfg.block_size * accum * world_size
        mfu = model.estimate_mfu(cfg.batch_size * accum, median, device) if use_cuda else float("nan")
        print(f"{cfg.parallelism} micro-batch {cfg.batch_size} x {accum} on {world_size} {args.device}: "
              f"median step {median * 1000:.1f} ms, {tokens / median:,.0f} tok/s, MFU {mfu * 100:.1f}%, "
              f"peak {peak:.2f} GiB, warm-up {warmup_s:.1f} s (first step {first_step_s:.1f} s)",
              flush=True)  # fmt: skip
        if args.compile_times:  # where the first step's compile went (torch's own per-phase seconds)
            print(torch._dynamo.utils.compile_times(repr="str", aggregate=True), flush=True)
            counters = torch._dynamo.utils.counters
            print(f"caches: aot_autograd {dict(counters['aot_autograd'])}, inductor "
                  f"{ {k: v for k, v in counters['inductor'].items() if 'cache' in k} }", flush=True)  # fmt: skip
        for stream, fraction in sorted(stream_busy(trace).items()):
            print(f"  {stream}: busy {fraction * 100:.1f}% of the profiled span", flush=True)
        sort_by = "device_time_total" if use_cuda else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort_by, row_limit=args.rows), flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2, help="processes (GPUs, or CPU ranks with --device cpu)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--compile-times", action="store_true", help="print torch.compile's seconds by phase")
    parser.add_argument("--optimize-ddp", choices=["ddp_optimizer", "no_optimization", "python_reducer"],
                        help="torch._dynamo.config.optimize_ddp (default: torch's)")  # fmt: skip
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, config_argv = parser.parse_args(argv[:split]), argv[split + 1 :]
    data_dir = args.out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split_name, n in (("train", 20_000_000), ("val", 100_000)):
        rng.integers(0, 50257, n, dtype=np.uint16).tofile(data_dir / f"{split_name}.bin")
    mp.spawn(worker, args=(args.gpus, free_port(), args, config_argv), nprocs=args.gpus)


if __name__ == "__main__":
    main()
