"""Compile time on CPU (or --device cuda), cold against warm through raygpt's compile cache (raygpt/worker/compile.py).

    python benchmarks/compile_cache_cpu.py [--repeats 2] [--n_layer 6 --n_embd 384 --block_size 256]

Each run is a fresh process with its own empty TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR, as a
restarted worker on another node would be. It compiles the model as training does (parallel.compile_model),
then times the first training forward+backward and the first eval forward (what a run pays before its
first step), and saves the artifacts. Cold runs start from an empty storage root; warm runs load the
root the first cold run saved. The table gives medians over the repeats. The default model is
shakespeare_char's (6 layers, 384 wide, block 256) with a small batch, so that compile, not compute,
is what is timed. On CPU a hit skips Dynamo's lowering, AOTAutograd and Inductor's code generation but
still compiles the kernels' C++ source (torch's artifacts carry no CPU binaries); on GPU the Triton
kernels are bundled in the artifacts, so a hit also skips Triton's compile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_process(args) -> None:
    """The measured process: load, compile and run the first train and eval passes, save; JSON on stdout."""
    import torch
    from torch._dynamo.utils import counters

    from raygpt.core.model import GPT, GPTConfig
    from raygpt.core.parallel import compile_model
    from raygpt.worker.compile import CompileCache

    shape = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    cache = CompileCache(args.child, device, {**shape, "batch_size": args.batch_size})
    cache.load()
    torch.manual_seed(0)
    model = GPT(GPTConfig(**shape, vocab_size=65, dropout=0.0, bias=False)).to(device)
    compiled = compile_model(model, "default")
    X = torch.randint(0, 65, (args.batch_size, args.block_size), device=device)
    start = time.time()
    _, loss = compiled(X, X)
    loss.backward()
    sync()
    train_s = time.time() - start
    start = time.time()
    compiled.eval()
    with torch.no_grad():
        compiled(X, X)
    compiled.train()
    sync()
    eval_s = time.time() - start
    start = time.time()
    _, loss = compiled(X, X)  # a compiled pass with nothing left to compile: what compute alone costs
    loss.backward()
    sync()
    step_s = time.time() - start
    cache.save()
    print(json.dumps(dict(train_s=train_s, eval_s=eval_s, step_s=step_s, hit=cache.hit,
                          fx_hits=counters["inductor"]["fxgraph_cache_hit"],
                          fx_misses=counters["inductor"]["fxgraph_cache_miss"],
                          loaded_mb=cache.loaded_bytes / 1e6, saved_mb=cache.saved_bytes / 1e6,
                          load_s=cache.load_seconds, save_s=cache.save_seconds)))  # fmt: skip


def run(root: Path, args, scratch: Path) -> dict:
    caches = Path(tempfile.mkdtemp(dir=scratch))
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(caches / "inductor"), TRITON_CACHE_DIR=str(caches / "triton"))
    shape = [
        f"--{key}={getattr(args, key)}" for key in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "device")
    ]
    start = time.time()
    done = subprocess.run([sys.executable, __file__, "--child", str(root), *shape], capture_output=True, text=True,
                          env=env, cwd=REPO, check=False)  # fmt: skip
    if done.returncode != 0:
        sys.exit(done.stderr)
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": time.time() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--n_layer", type=int, default=6)
    parser.add_argument("--n_head", type=int, default=6)
    parser.add_argument("--n_embd", type=int, default=384)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument(
        "--device", default="cpu", help="cuda: the same comparison on a GPU (a check, not this script's aim)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the storage root of one measured process
    args = parser.parse_args()
    if args.child:
        one_process(args)
        return
    with tempfile.TemporaryDirectory(prefix="compile-cache-bench-") as scratch:
        shared_root = Path(scratch) / "storage"
        runs = {"cold": [], "warm": []}
        for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits both alike
            cold_root = shared_root if not runs["cold"] else Path(tempfile.mkdtemp(dir=scratch))
            runs["cold"].append(run(cold_root, args, Path(scratch)))
            runs["warm"].append(run(shared_root, args, Path(scratch)))
    print(f"{args.device}, {os.cpu_count()} CPU cores; model {args.n_layer}x{args.n_embd}, block {args.block_size}, "
          f"batch {args.batch_size}; medians of {args.repeats}")  # fmt: skip
    print(
        "| run | process s | 1st train fwd+bwd s | 1st eval s | compiled step s | FX hits/misses | cache MB | load s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, results in runs.items():
        median = {key: statistics.median(r[key] for r in results) for key in results[0] if key != "hit"}
        print(f"| {name} | {median['process_s']:.1f} | {median['train_s']:.1f} | {median['eval_s']:.1f} | "
              f"{median['step_s']:.2f} | {median['fx_hits']:.0f}/{median['fx_misses']:.0f} | "
              f"{max(median['loaded_mb'], median['saved_mb']):.1f} | {median['load_s']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
