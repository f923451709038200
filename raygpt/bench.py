"""`python -m raygpt.bench [CONFIG_FILE] [--key=value ...]`: tokens/s and MFU of one training step.

Runs raygpt's own training step (the one train_loop_per_worker runs) on one device, without Ray, on
random tokens, after warm-up (and compile), and prints a short table. `--profile DIR` also writes a
torch profiler trace of a few steps (open it in Perfetto or chrome://tracing).

    python -m raygpt.bench configs/train_gpt2.py --batch_size=16 --gradient_accumulation_steps=1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from raygpt.config import ConfigError, load_config
from raygpt.data import Batches
from raygpt.model import GPT, GPTConfig
from raygpt.speed import compile_model, set_attention_backend, skip_nonfinite_on_device, uses_cuda_graphs
from raygpt.train import forward_backward, resolve_dtype


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raygpt.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile happens here)")
    parser.add_argument("--vocab-size", type=int, default=50304, help="65 for shakespeare_char's model")
    parser.add_argument("--profile", metavar="DIR", help="write a torch profiler trace of 5 steps to DIR")
    args, config_argv = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(config_argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    use_cuda = cfg.device == "cuda" and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        set_attention_backend(cfg.attention)
    dtype = resolve_dtype(cfg.dtype, device)
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    autocast = nullcontext() if dtype == "float32" else torch.amp.autocast(device_type=device.type, dtype=ptdtype)

    torch.manual_seed(cfg.seed)
    model = GPT(
        GPTConfig(
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.n_embd,
            block_size=cfg.block_size,
            bias=cfg.bias,
            vocab_size=args.vocab_size,
            dropout=cfg.dropout,
        )
    ).to(device)
    optimizer = model.configure_optimizers(
        cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type, verbose=False
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
    step_model = compile_model(model, cfg.compile_mode, cfg.compile_regions) if cfg.compile else model
    cuda_graphs = cfg.compile and uses_cuda_graphs(cfg.compile_mode, device.type)

    with tempfile.TemporaryDirectory() as data_dir:
        # Random tokens: the step's speed does not depend on what the tokens say.
        rng = np.random.default_rng(0)
        for split in ("train", "val"):
            rng.integers(0, min(args.vocab_size, 50257), 2_000_000, dtype=np.uint16).tofile(
                Path(data_dir) / f"{split}.bin"
            )
        batches = Batches(data_dir, cfg.block_size, cfg.batch_size, cfg.seed, device=device)
        X, Y = batches.train_batch(0, 0)

        def step(it):
            nonlocal X, Y
            _, grad_norm, X, Y = forward_backward(
                step_model,
                model,
                optimizer,
                scaler,
                autocast,
                batches,
                X,
                Y,
                it,
                cfg.gradient_accumulation_steps,
                cfg.grad_clip,
                ddp=False,
                cuda_graphs=cuda_graphs,
            )
            # The same step as training: the non-finite check stays on the GPU when it can.
            if scaler.is_enabled() or skip_nonfinite_on_device(optimizer, grad_norm) is None:
                scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        def sync():
            if use_cuda:
                torch.cuda.synchronize()

        for it in range(args.warmup):
            step(it)
        sync()
        if use_cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for it in range(args.warmup, args.warmup + args.steps):
            t0 = time.perf_counter()
            step(it)
            sync()
            times.append(time.perf_counter() - t0)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
            with profile(activities=activities) as prof:
                for it in range(5):
                    step(it)
                sync()
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            trace = Path(args.profile) / "trace.json"
            prof.export_chrome_trace(str(trace))
            print(prof.key_averages().table(sort_by="cuda_time_total" if use_cuda else "cpu_time_total", row_limit=15))
            print(f"trace: {trace}")

    dt = statistics.median(times)
    tokens = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    mfu = model.estimate_mfu(cfg.batch_size * cfg.gradient_accumulation_steps, dt, device)
    name = torch.cuda.get_device_name(device) if use_cuda else "cpu"
    peak_mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if use_cuda else "n/a"
    compiled = f"{cfg.compile_mode}" if cfg.compile else "off"
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
