"""DDP against FSDP2 (and FSDP2 with activation checkpointing) for one model on the GPUs of one host.

    python benchmarks/fsdp_vs_ddp.py --work-dir /tmp/fsdp-bench --gpus 2 [--model gpt2-xl] \
        [--runs ddp:8 fsdp:8 fsdp-full:32] [--iters 25] [--accum 2] [--skip 10] [--stop]
    python benchmarks/fsdp_vs_ddp.py --work-dir /tmp/fsdp-bench --gpus 2 --model gpt3-6.7b \
        --runs ddp:1 fsdp-full:4 --iters 8 --accum 4 --skip 3 --stop

Each run is `python -m raygpt.launch --num-workers GPUS` on random tokens (bf16, compile), one after
another on the same machine; the table gives the median ms/iter over iterations --skip on, tokens/s, MFU
(6N + 12LHQT FLOPs a token over 989 TFLOP/s a GPU, H100 SXM / H200) and rank 0's peak GPU memory. A run
that runs out of memory is reported as such (the memory check is off, so it really tries). --accum is
the global micro-steps per iteration (gradient_accumulation_steps; default: one per GPU). --stop
interrupts each run once it has logged --iters iterations (it is set to run longer), so no run reaches
its final eval and checkpoint (100 GB at 6.7B).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_vs_nanogpt import run_and_parse  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = {  # n_layer, n_head, n_embd, block_size
    "gpt2": (12, 12, 768, 1024),
    "gpt2-xl": (48, 25, 1600, 1024),
    "gpt3-6.7b": (32, 32, 4096, 2048),
    "tiny": (2, 2, 64, 64),  # a smoke test of this script on CPU: --model tiny --device cpu
}
PEAK_FLOPS = 989e12
VOCAB = 50304


def flops_per_token(n_layer: int, n_head: int, n_embd: int, block_size: int) -> float:
    params = 12 * n_layer * n_embd**2 + VOCAB * n_embd  # matrices and wte (tied head), as nanoGPT counts
    return 6 * params + 12 * n_layer * n_head * (n_embd // n_head) * block_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--model", choices=MODELS, default="gpt2-xl")
    parser.add_argument("--runs", nargs="+", default=["ddp:8", "fsdp:8", "fsdp-full:32"],
                        help="PARALLELISM[-ACTIVATION_CHECKPOINTING]:MICRO_BATCH each")  # fmt: skip
    parser.add_argument("--iters", type=int, default=25)
    parser.add_argument("--accum", type=int, default=0, help="global micro-steps per iteration; 0: --gpus")
    parser.add_argument("--skip", type=int, default=10, help="warm-up iterations left out of the median")
    parser.add_argument("--stop", action="store_true", help="Ctrl-C each run after --iters: no final checkpoint")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", type=Path, default=Path("fsdp_vs_ddp.md"))
    args = parser.parse_args()
    n_layer, n_head, n_embd, block_size = MODELS[args.model]
    accum = args.accum or args.gpus
    max_iters = args.iters + 100 if args.stop else args.iters  # --stop: never reaches the end
    data = args.work_dir / "data" / "random"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 50_000_000), ("val", 1_000_000)):
        rng.integers(0, 50257, n, dtype=np.uint16).tofile(data / f"{split}.bin")
    rows = []
    for spec in args.runs:
        mode, batch = spec.split(":")
        parallelism, _, recompute = mode.partition("-")
        name = f"{parallelism.upper()}{f' + {recompute} AC' if recompute else ''}, micro-batch {batch}"
        command = [sys.executable, "-m", "raygpt.launch", f"--num-workers={args.gpus}", "--dataset=random",
                   f"--data_dir={args.work_dir / 'data'}", f"--out_dir={args.work_dir / f'out-{mode}-{batch}'}",
                   f"--storage_path={args.work_dir / 'ray'}", f"--n_layer={n_layer}", f"--n_head={n_head}",
                   f"--n_embd={n_embd}", f"--block_size={block_size}", "--bias=False", "--dropout=0.0",
                   f"--batch_size={batch}", f"--gradient_accumulation_steps={accum}", f"--max_iters={max_iters}",
                   "--eval_interval=100000", "--eval_iters=1", "--log_interval=1", "--warmup_iters=5",
                   f"--lr_decay_iters={args.iters * 10}", "--always_save_checkpoint=False", "--compile=True",
                   "--dtype=bfloat16", f"--parallelism={parallelism}", f"--device={args.device}",
                   f"--activation_checkpointing={recompute or 'none'}", "--check_memory=False"]  # fmt: skip
        log = args.work_dir / f"{mode}-{batch}.log"
        try:
            stop_after = args.iters - 1 if args.stop else 0
            result = run_and_parse(name, command, REPO, log, None, skip_iters=args.skip, stop_after=stop_after)
        except SystemExit:
            oom = "out of memory" in log.read_text(errors="replace").lower()
            rows.append(f"| {name} | {'out of memory' if oom else 'failed (see log)'} | | | | |")
            print(rows[-1], flush=True)
            continue
        dt = result["median_ms"] / 1000
        tokens_per_gpu = int(batch) * block_size * accum // args.gpus  # an iteration's tokens on one GPU
        mfu = flops_per_token(n_layer, n_head, n_embd, block_size) * tokens_per_gpu / dt / PEAK_FLOPS
        peak = f"{result['peak_gib']:.2f} GiB" if result["peak_gib"] is not None else "n/a"
        rows.append(f"| {name} | {result['median_ms']:.1f} | {tokens_per_gpu * args.gpus / dt:,.0f} | "
                    f"{mfu * 100:.1f}% | {peak} | {result['first_iter_s']:.0f} |")  # fmt: skip
        print(rows[-1], flush=True)  # each run's row as soon as it is measured
    query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
    gpu = subprocess.run(query, capture_output=True, text=True) if shutil.which("nvidia-smi") else None
    device = gpu.stdout.splitlines()[0] if gpu and gpu.stdout else args.device
    table = [
        f"{args.model} on {args.gpus} x {device}, bf16, compile, "
        f"micro-steps per iteration {accum}, {args.iters} iterations (median from {args.skip}), random tokens",
        "",
        "| run | ms/iter | tokens/s | MFU | peak memory (rank 0) | first step (s from command) |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    args.out.write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
