"""How long training stops for a checkpoint: synchronous against asynchronous saves, on the GPUs of one host.

    python benchmarks/checkpoint_pause.py --work-dir /tmp/pause --gpus 2 \
        --runs gpt2:ddp:12 gpt2-xl:fsdp:8 [--iters 60 --every 20] [--modes sync async]

Each run is `python -m raygpt.launch --num-workers GPUS` on random tokens (bf16, compile) that checkpoints
every EVERY iterations, once with --async_checkpoint=False and once with True, one after the other on the
same machine. The pause is what rank 0 prints for each save ("training paused X s"): the time the step
loop stood still for it. Synchronous, that is the whole write and Ray's copy into storage; asynchronous,
the copy to host memory (the first save also allocates the pinned host buffers, so it is listed apart).
The step time beside it is the median ms/iter away from the saves.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsdp_vs_ddp import MODELS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAVED = re.compile(r"saved checkpoint at iter (\d+) .*training paused ([\d.]+)s, written .*in ([\d.]+)s")
ITER = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", re.MULTILINE)


def run(work_dir: Path, gpus: int, model: str, parallelism: str, batch: int, iters: int, every: int,
        asynchronous: bool) -> dict:  # fmt: skip
    n_layer, n_head, n_embd, block_size = MODELS[model]
    tag = f"{model}-{parallelism}-{'async' if asynchronous else 'sync'}"
    command = [sys.executable, "-m", "raygpt.launch", f"--num-workers={gpus}", "--dataset=random",
               f"--data_dir={work_dir / 'data'}", f"--out_dir={work_dir / f'out-{tag}'}",
               f"--storage_path={work_dir / 'ray'}", f"--n_layer={n_layer}", f"--n_head={n_head}",
               f"--n_embd={n_embd}", f"--block_size={block_size}", "--bias=False", "--dropout=0.0",
               f"--batch_size={batch}", f"--gradient_accumulation_steps={gpus}", f"--max_iters={iters}",
               f"--eval_interval={every}", "--eval_iters=1", "--log_interval=1", "--warmup_iters=5",
               f"--lr_decay_iters={iters * 10}", "--always_save_checkpoint=True", "--compile=True",
               "--dtype=bfloat16", f"--parallelism={parallelism}", f"--async_checkpoint={asynchronous}",
               "--checkpoints_to_keep=1", "--check_memory=False"]  # fmt: skip
    log = work_dir / f"{tag}.log"
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        sys.exit(f"{tag} failed, see {log}")
    saves = [(int(m[1]), float(m[2]), float(m[3])) for m in SAVED.finditer(done.stdout)]
    steps = [(int(m[1]), float(m[2])) for m in ITER.finditer(done.stdout)]
    # Steps right after a save carry its pause (and an eval); the rest give the step time.
    quiet = [ms for i, ms in steps if i >= 10 and i % every not in (0, 1)]
    return {"saves": saves, "step_ms": statistics.median(quiet) if quiet else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--runs", nargs="+", default=["gpt2:ddp:12", "gpt2-xl:fsdp:8"],
                        help="MODEL:PARALLELISM:MICRO_BATCH each")  # fmt: skip
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--modes", nargs="+", choices=["sync", "async"], default=["sync", "async"])
    parser.add_argument("--out", type=Path, default=Path("checkpoint_pause.md"))
    args = parser.parse_args()
    data = args.work_dir / "data" / "random"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 20_000_000), ("val", 1_000_000)):
        rng.integers(0, 50257, n, dtype=np.uint16).tofile(data / f"{split}.bin")
    rows = []
    for spec in args.runs:
        model, parallelism, batch = spec.split(":")
        for asynchronous in (mode == "async" for mode in args.modes):
            result = run(args.work_dir, args.gpus, model, parallelism, int(batch), args.iters, args.every,
                         asynchronous)  # fmt: skip
            pauses = [pause for _, pause, _ in result["saves"]]
            later = pauses[1:] or pauses
            rows.append(
                f"| {model}, {parallelism.upper()}, micro-batch {batch} | {'async' if asynchronous else 'sync'} | "
                f"{pauses[0]:.2f} | {', '.join(f'{p:.2f}' for p in later)} | "
                f"{statistics.median(w for *_, w in result['saves']):.2f} | {result['step_ms']:.1f} |"
            )
            print(rows[-1], flush=True)
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    table = [
        f"{args.gpus} x {gpu.stdout.splitlines()[0] if gpu.stdout else 'GPU'}, bf16, compile, a checkpoint every "
        f"{args.every} iterations over {args.iters}, random tokens",
        "",
        "| run | saves | first pause (s) | later pauses (s) | write + hand to Ray, median (s) | step (ms) |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    args.out.write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
