"""Does scoring each checkpoint in a Ray validation task slow training down?

Runs `python -m raygpt.launch` on the nanoGPT shakespeare_char config (one GPU worker), alternately without
evals and with `--evals=bpb` scored in a Ray task on CPUs beside the training, and compares the step times
rank 0 wrote to metrics.jsonl (the first WARMUP iterations, the compile among them, left out; the step after
each eval, whose time holds the eval and the checkpoint in both modes, left out too).

    python benchmarks/validation_overhead.py [--rounds 2] [--max-iters 500] [--eval-interval 125] [-- --key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "tests" / "data" / "tinyshakespeare.txt"
WARMUP = 50


def step_times(metrics: Path, eval_interval: int) -> list[float]:
    times = []
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        it = record.get("iter", 0)
        if "time_ms" in record and it >= WARMUP and it % eval_interval != 0:
            times.append(record["time_ms"])
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-iters", type=int, default=500)
    parser.add_argument("--eval-interval", type=int, default=125)
    parser.add_argument("--eval-cpus", type=int, default=4)
    parser.add_argument("extra", nargs="*", help="more --key=value for both modes (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare = [sys.executable, "-m", "raygpt.prepare", "shakespeare_char", "--input", str(CORPUS),
                   "--data-dir", str(data)]  # fmt: skip
        subprocess.run(prepare, check=True, capture_output=True)
        rows = []
        for round_ in range(args.rounds):
            for mode in ("off", "on"):
                out = Path(tmp) / f"out-{mode}-{round_}"
                command = [sys.executable, "-m", "raygpt.launch", str(REPO / "configs" / "train_shakespeare_char.py"),
                           f"--data_dir={data}", f"--out_dir={out}", f"--storage_path={Path(tmp) / 'ray'}",
                           f"--max_iters={args.max_iters}", f"--lr_decay_iters={args.max_iters}",
                           f"--eval_interval={args.eval_interval}", "--eval_iters=20", "--log_interval=1",
                           "--always_save_checkpoint=True"]  # fmt: skip
                command += [f"--warmup_iters={min(100, args.max_iters // 5)}", *args.extra]
                if mode == "on":
                    command += ["--evals=bpb", "--eval_examples=200", f"--eval_cpus={args.eval_cpus}"]
                start = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True)
                wall = time.perf_counter() - start
                if done.returncode != 0:
                    print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
                    return 1
                validations = sum(line.startswith("validation of iter") for line in done.stdout.splitlines())
                times = step_times(out / "metrics.jsonl", args.eval_interval)
                rows.append((mode, round_, statistics.median(times), statistics.mean(times), validations, wall))
                print(f"{mode} round {round_}: median {rows[-1][2]:.2f} ms, mean {rows[-1][3]:.2f} ms, "
                      f"{validations} validations, {wall:.0f} s", flush=True)  # fmt: skip
        print("\n| evals | round | median step ms | mean step ms | validations shown | run wall s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for mode, round_, median, mean, validations, wall in rows:
            print(f"| {'bpb in a Ray task' if mode == 'on' else 'none'} | {round_} | {median:.2f} | {mean:.2f} | "
                  f"{validations} | {wall:.0f} |")  # fmt: skip
        on = statistics.mean(r[3] for r in rows if r[0] == "on")
        off = statistics.mean(r[3] for r in rows if r[0] == "off")
        print(f"\nmean step time, evals on / off: {on / off:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
