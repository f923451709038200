"""Is fp8=True's loss within bf16's run-to-run noise? Short runs of raygpt's step on real tokens.

    python benchmarks/fp8_loss.py --corpus third_party/tinyshakespeare.txt --out /tmp/fp8-loss
    python benchmarks/fp8_loss.py --corpus ../shared/data/tinyshakespeare.txt --out /tmp/fp8-loss --device cpu --tiny

On one device, GPT-2 BPE tiny Shakespeare (raygpt.prepare's output, written to --out once) trains for
--steps iterations with raygpt's own step (GPT, wrap_model, TrainStep, the configured AdamW), in bf16 with
seeds 1 and 2 (their difference is the run-to-run noise: another initialisation and batch order) and with
fp8=True under the same seeds. Every run is evaluated on the same fixed windows (Evaluator, seed 0) at
each --eval-every steps and at the end; the table gives the final train/val losses, |fp8 - bf16| per
seed beside |bf16 seed 1 - bf16 seed 2|, and the median step time. The learning rate warms up linearly
over the first tenth of the steps, then stays constant.

Shape: 6 layers of 768 (a GPT-2-small width, every Linear dimension a multiple of 16), block 512,
micro-batch 16, compiled: 300 steps of each of the four runs take under 3 minutes on an H100. --tiny is
a 2-layer, 64-wide model, micro-batch 4 x 32, for 10 steps (under a minute on 2 CPU cores). raygpt
refuses fp8 off CUDA, so on --device cpu the fp8 runs swap the Linears themselves
(raygpt.core.fp8.float8_block_linears, torch's CPU float8 matmul) and are skipped where that matmul does not
exist.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from raygpt.config.cli import read_config
from raygpt.core.data import Batches
from raygpt.core.fp8 import float8_block_linears
from raygpt.core.model import GPT, GPTConfig
from raygpt.core.parallel import enable_tf32, wrap_model
from raygpt.core.step import Evaluator, NonFiniteGuard, Precision, TrainStep
from raygpt.core.tokenizer import PADDED_GPT2_VOCAB_SIZE
from raygpt.prep.shakespeare import prepare_shakespeare_bpe

SHAPES = {
    "full": ["--n_layer=6", "--n_head=12", "--n_embd=768", "--block_size=512", "--batch_size=16"],
    "tiny": ["--n_layer=2", "--n_head=4", "--n_embd=64", "--block_size=32", "--batch_size=4", "--compile=False"],
}
SEEDS = (1, 2)


def cpu_float8_matmul_works() -> bool:
    one = torch.ones((), dtype=torch.float32)
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def train_once(dataset_dir: Path, shape: list[str], seed: int, fp8: bool, args, device: torch.device) -> dict:
    """One run: the losses at each evaluation and the median step time."""
    on_cuda = device.type == "cuda"
    cfg, _ = read_config([*shape, f"--seed={seed}", "--dtype=bfloat16", f"--device={device.type}",
                          "--dropout=0.0", "--bias=False", f"--fp8={fp8 and on_cuda}"])  # fmt: skip
    precision = Precision(cfg.dtype, device)
    torch.manual_seed(seed)
    model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                      vocab_size=PADDED_GPT2_VOCAB_SIZE, dropout=0.0, bias=False)  # fmt: skip
    model = GPT(GPTConfig(**model_args)).to(device)
    if fp8 and not on_cuda:
        float8_block_linears(model)  # what wrap_model does with fp8=True, on torch's CPU float8 matmul
    wrapped = wrap_model(model, cfg, 1, device, precision.dtype)
    optimizer = model.configure_optimizers(cfg.weight_decay, args.lr, (cfg.beta1, cfg.beta2), device.type, False)
    batches = Batches(dataset_dir, cfg.block_size, cfg.batch_size, seed, device=device)
    # Every run is evaluated on the same windows, so the noise measured is the training's alone.
    eval_batches = Batches(dataset_dir, cfg.block_size, cfg.batch_size, 0, device=device)
    evaluate = Evaluator(wrapped, eval_batches, precision, args.eval_iters, model_args, 0, 1)
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, device, announce=True)
    step = TrainStep(wrapped, optimizer, precision, batches, 1, cfg.grad_clip, guard)
    warmup = max(1, args.steps // 10)
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    X, Y = batches.train_batch(0, 0)
    losses, times = {}, []
    for it in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (it + 1) / warmup)
        started = time.perf_counter()
        _, _, X, Y = step(X, Y, it)
        sync()
        times.append(time.perf_counter() - started)
        if (it + 1) % args.eval_every == 0 or it + 1 == args.steps:
            losses[it + 1] = evaluate()
    guard.check(args.steps)
    return {"losses": losses, "ms": statistics.median(times[len(times) // 2 :]) * 1000}


def report(runs: dict[tuple[str, int], dict]) -> None:
    steps = sorted(next(iter(runs.values()))["losses"])
    print("| run | seed | " + " | ".join(f"val @{s}" for s in steps) + " | final train | median ms/step |")
    print("| --- | --- | " + " | ".join("---" for _ in steps) + " | --- | --- |")
    for (kind, seed), run in runs.items():
        vals = " | ".join(f"{run['losses'][s]['val']:.4f}" for s in steps)
        print(f"| {kind} | {seed} | {vals} | {run['losses'][steps[-1]]['train']:.4f} | {run['ms']:.1f} |")
    final = {key: run["losses"][steps[-1]] for key, run in runs.items()}
    for split in ("train", "val"):
        noise = abs(final["bf16", 1][split] - final["bf16", 2][split])
        gaps = [abs(final["fp8", s][split] - final["bf16", s][split]) for s in SEEDS if ("fp8", s) in final]
        shown = ", ".join(f"seed {s}: {g:.4f}" for s, g in zip(SEEDS, gaps)) or "no fp8 runs"
        print(f"final {split} loss: bf16 seed 1 vs seed 2 differ by {noise:.4f}; fp8 vs bf16 ({shown})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True, help="tiny Shakespeare's text")
    parser.add_argument("--out", type=Path, required=True, help="the prepared dataset goes here (kept)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer 64-wide model for 10 steps")
    parser.add_argument("--steps", type=int, default=None, help="default: 300 (10 with --tiny)")
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-iters", type=int, default=None, help="default: 20 (2 with --tiny)")
    args = parser.parse_args()
    args.steps = args.steps or (10 if args.tiny else 300)
    args.eval_iters = args.eval_iters or (2 if args.tiny else 20)
    args.eval_every = min(args.eval_every, args.steps)
    device = torch.device(args.device)
    if device.type == "cuda":
        enable_tf32()
    dataset_dir = args.out / "shakespeare"
    if not (dataset_dir / "val.bin").exists():
        prepare_shakespeare_bpe(args.out, args.corpus)
    kinds = ["bf16", "fp8"]
    if device.type == "cpu" and not cpu_float8_matmul_works():
        print("torch has no float8 matmul on this CPU: the fp8 runs are skipped")
        kinds = ["bf16"]
    shape = SHAPES["tiny" if args.tiny else "full"]
    runs = {}
    for kind in kinds:
        for seed in SEEDS:
            started = time.time()
            runs[kind, seed] = train_once(dataset_dir, shape, seed, kind == "fp8", args, device)
            print(f"{kind} seed {seed}: {time.time() - started:.0f} s", flush=True)
    report(runs)


if __name__ == "__main__":
    main()
