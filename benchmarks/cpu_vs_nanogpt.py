"""nanoGPT's README CPU run, through nanoGPT's train.py and through raygpt (1 worker), side by side.

    python benchmarks/cpu_vs_nanogpt.py --nanogpt PATH/TO/nanoGPT [--max-iters 2000] [--out TABLE.md]

PATH/TO/nanoGPT is a checkout of karpathy/nanoGPT kept outside this repo. Both runs train on the same
shakespeare_char .bin files (prepared by raygpt; nanoGPT is given a meta.pkl with the same vocabulary),
one after the other on the same machine (nanoGPT, raygpt with one Ray worker, raygpt's same loop in
Ray Train's local mode, and one Ray worker replaying nanoGPT's random stream with --data_order=nanogpt),
and the table reports, for each: val loss at the last eval,
median ms/iter over the iterations after warm-up, and the seconds from the command to the first iteration.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# nanoGPT's README "I only have a macbook" settings, with the eval_iters/log_interval the issue names.
CPU_ARGS = [
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--dropout=0.0",
]
ITER_LINE = re.compile(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms")
EVAL_LINE = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
PEAK_MEMORY = re.compile(r"peak memory ([\d.]+) GiB")  # raygpt's eval lines; peak_memory.py for nanoGPT


def run_and_parse(
    name: str, command: list[str], cwd: Path, log_path: Path, env: dict, skip_iters: int = 10, stop_after: int = 0
) -> dict:
    """Run `command`, tee its output to log_path, and pull ms/iter, evals and time-to-first-iter from it.
    Iterations before skip_iters are warm-up, left out of the median. stop_after: interrupt the run (Ctrl-C)
    once that iteration is logged, before its final eval and checkpoint (a 6.7B checkpoint is 100 GB)."""
    start = time.time()
    first_iter_s = None
    step_ms, evals = [], []
    peak_gib = None
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        for line in process.stdout:
            log.write(f"{time.time() - start:8.2f} {line}")  # seconds since the command: a timeline
            if match := ITER_LINE.search(line):
                if first_iter_s is None:
                    first_iter_s = time.time() - start
                if int(match.group(1)) >= skip_iters:
                    step_ms.append(float(match.group(2)))
                if stop_after and int(match.group(1)) >= stop_after and process.poll() is None:
                    process.send_signal(signal.SIGINT)
            elif match := EVAL_LINE.search(line):
                evals.append((int(match.group(1)), float(match.group(3))))
            if match := PEAK_MEMORY.search(line):
                peak_gib = max(peak_gib or 0.0, float(match.group(1)))
        if process.wait() not in ((0, 130) if stop_after else (0,)):  # 130: interrupted as asked
            sys.exit(f"{name} failed, see {log_path}")
    return {
        "name": name,
        "wall_s": time.time() - start,
        "first_iter_s": first_iter_s,
        "median_ms": statistics.median(step_ms),
        "evals": evals,
        "peak_gib": peak_gib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", required=True, type=Path, help="a karpathy/nanoGPT checkout (not in this repo)")
    parser.add_argument("--max-iters", type=int, default=2000)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/raygpt-bench-cpu"))
    # benchmarks/cpu_results.md is curated (tables of several runs plus their reading): not overwritten.
    parser.add_argument("--out", type=Path, default=Path("/tmp/raygpt-bench-cpu-results.md"))
    args = parser.parse_args()
    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    # One dataset for both: raygpt prepares it; nanoGPT reads it from its own data/ folder.
    sys.path.insert(0, str(REPO))
    from raygpt.core.tokenizer import load_meta
    from raygpt.prep.dataset import prepare_dataset

    corpus = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
    dataset_dir = prepare_dataset("shakespeare_char", work / "data", input_path=corpus if corpus.exists() else None)
    nanogpt_data = args.nanogpt / "data" / "shakespeare_char"
    for name in ("train.bin", "val.bin"):
        shutil.copy(dataset_dir / name, nanogpt_data / name)
    chars = load_meta(dataset_dir)["chars"]
    with open(nanogpt_data / "meta.pkl", "wb") as f:  # nanoGPT's own format, written only into its checkout
        pickle.dump(
            {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}, f
        )

    iters = [f"--max_iters={args.max_iters}", f"--lr_decay_iters={args.max_iters}"]
    nanogpt = run_and_parse(
        "nanoGPT train.py",
        [
            sys.executable,
            "train.py",
            "config/train_shakespeare_char.py",
            *CPU_ARGS,
            *iters,
            f"--out_dir={work / 'out-nanogpt'}",
        ],
        args.nanogpt,
        work / "nanogpt.log",
        env,
    )
    raygpt = run_and_parse(
        "raygpt (1 Ray worker)",
        [
            sys.executable,
            "-m",
            "raygpt.launch",
            "configs/train_shakespeare_char.py",
            *CPU_ARGS,
            *iters,
            f"--data_dir={work / 'data'}",
            f"--out_dir={work / 'out-raygpt'}",
            f"--storage_path={work / 'ray'}",
            "--num_workers=1",
        ],
        REPO,
        work / "raygpt.log",
        env,
    )
    # The same loop in this process (Ray Train's local mode): separates raygpt's loop from Ray's runtime.
    local = run_and_parse(
        "raygpt --local_mode=True (no Ray processes)",
        [
            sys.executable,
            "-m",
            "raygpt.launch",
            "configs/train_shakespeare_char.py",
            *CPU_ARGS,
            *iters,
            f"--data_dir={work / 'data'}",
            f"--out_dir={work / 'out-local'}",
            "--local_mode=True",
        ],
        REPO,
        work / "raygpt-local.log",
        env,
    )
    # nanoGPT's own random stream (batches, eval batches): the val loss can be compared number for number.
    replay = run_and_parse(
        "raygpt --data_order=nanogpt (1 Ray worker)",
        [
            sys.executable,
            "-m",
            "raygpt.launch",
            "configs/train_shakespeare_char.py",
            *CPU_ARGS,
            *iters,
            f"--data_dir={work / 'data'}",
            f"--out_dir={work / 'out-replay'}",
            f"--storage_path={work / 'ray'}",
            "--num_workers=1",
            "--data_order=nanogpt",
        ],
        REPO,
        work / "raygpt-replay.log",
        env,
    )

    rows = [
        "| run | val loss at last eval | median ms/iter | vs nanoGPT | command to first iter (s) | wall (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in (nanogpt, raygpt, local, replay):
        last_iter, last_val = r["evals"][-1]
        rows.append(
            f"| {r['name']} | {last_val:.4f} (iter {last_iter}) | {r['median_ms']:.2f} | "
            f"{r['median_ms'] / nanogpt['median_ms']:.3f}x | {r['first_iter_s']:.1f} | {r['wall_s']:.0f} |"
        )
    import torch

    table = "\n".join(rows)
    header = (
        f"Command: `python benchmarks/cpu_vs_nanogpt.py --nanogpt PATH --max-iters {args.max_iters}`\n\n"
        f"Machine: {os.cpu_count()} CPUs, torch {torch.__version__}, Python {sys.version.split()[0]}; "
        f"run {time.strftime('%Y-%m-%d')}.\n\n"
    )
    args.out.write_text("# CPU: nanoGPT's README CPU run, nanoGPT vs raygpt\n\n" + header + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
