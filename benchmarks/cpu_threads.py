"""torch's CPU threads beside other work: raygpt.bench's step and raygpt.sample's tokens/s with each thread
count, on a quiet machine and beside processes that keep cores busy.

    python benchmarks/cpu_threads.py [--tools bench sample] [--threads default 1 2] [--busy 0 1] [--repeats 3]
                                     [--wait-policy]

The model is configs/train_shakespeare_char_cpu.py's (0.8M parameters): bench trains it on shakespeare_char
(prepared from tests/data), sample generates from an untrained checkpoint of it (speed does not depend on
the weights). A busy process is a Python loop this script starts at nice 0 before a run and ends by its
pid after it. 'default' runs the CLIs without --threads (their own choice, which they print). Runs are
interleaved over the settings, `repeats` times; the table gives each setting's median, the thread
counts the CLIs reported, and the 1-minute load average before its runs (other processes count in it).
--wait-policy adds runs with OMP_WAIT_POLICY=PASSIVE (GNU OpenMP's idle threads sleep, not spin).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "train_shakespeare_char_cpu.py"
TIMEOUT_S = 600


def make_inputs(folder: Path) -> tuple[Path, Path]:
    """shakespeare_char's data_dir, and an out_dir holding an untrained ckpt.pt of the CPU config's model."""
    import torch

    from raygpt.core import checkpoint
    from raygpt.core.model import GPT, GPTConfig
    from raygpt.prep.shakespeare import prepare_shakespeare_char

    data_dir, out_dir = folder / "data", folder / "out"
    with contextlib.redirect_stdout(sys.stderr):  # stdout: the table alone
        prepare_shakespeare_char(data_dir, input_path=REPO / "tests" / "data" / "tinyshakespeare.txt")
    model_args = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, bias=False, vocab_size=65)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**model_args, dropout=0.0))
    config = {"data_dir": str(data_dir), "dataset": "shakespeare_char"}
    out_dir.mkdir()
    checkpoint.save_atomic({"model": model.state_dict(), "model_args": model_args, "iter_num": 0, "config": config},
                           out_dir / checkpoint.CKPT_NAME)  # fmt: skip
    return data_dir, out_dir


def run_tool(tool: str, threads: str, policy: str, data_dir: Path, out_dir: Path) -> tuple[float, str]:
    """(ms per step or tokens/s, the thread line) of one run of raygpt.bench or raygpt.sample."""
    option = [] if threads == "default" else ["--threads", threads]
    if tool == "bench":
        args = ["raygpt.bench", str(CONFIG), f"--data_dir={data_dir}", "--steps", "10", "--warmup", "2"]
    else:
        args = ["raygpt.sample", "--out-dir", str(out_dir), "--num-samples", "1", "--max-new-tokens", "200"]
        args += ["--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), **({"OMP_WAIT_POLICY": policy} if policy else {})}
    done = subprocess.run([sys.executable, "-m", *args, *option], capture_output=True, text=True, env=env,
                          timeout=TIMEOUT_S, check=True)  # fmt: skip
    output = done.stdout + done.stderr
    thread_line = re.search(r"^cpu: (\d+) thread", output, re.M).group(1)
    if tool == "bench":
        return float(re.split(r"\s*\|\s*", done.stdout.strip().splitlines()[-1])[8]), thread_line
    return float(re.search(r"\(([\d,.]+) tokens/s\)", done.stderr).group(1).replace(",", "")), thread_line


def with_busy_processes(count: int, measure):
    """measure() while `count` Python loops keep cores busy."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        return measure()
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tools", nargs="+", default=["bench", "sample"], choices=["bench", "sample"])
    parser.add_argument("--threads", nargs="+", default=["default", "1", "2"])
    parser.add_argument("--busy", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wait-policy", action="store_true")
    args = parser.parse_args()
    policies = ["", "PASSIVE"] if args.wait_policy else [""]
    settings = [(tool, busy, threads, policy) for tool in args.tools for busy in args.busy
                for threads in args.threads for policy in policies]  # fmt: skip
    results: dict[tuple, list] = {setting: [] for setting in settings}
    with tempfile.TemporaryDirectory() as folder:
        data_dir, out_dir = make_inputs(Path(folder))
        for _ in range(args.repeats):
            for tool, busy, threads, policy in settings:
                load = os.getloadavg()[0]
                value, used = with_busy_processes(
                    busy, functools.partial(run_tool, tool, threads, policy, data_dir, out_dir)
                )
                results[(tool, busy, threads, policy)].append((value, used, load))
                print(f"{tool} busy={busy} threads={threads} {policy}: {value} (threads {used}, load {load:.1f})",
                      file=sys.stderr, flush=True)  # fmt: skip
    print("| tool | busy processes | --threads | OMP_WAIT_POLICY | threads used | result (median) | runs | load avg |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (tool, busy, threads, policy), runs in results.items():
        unit = "ms/step" if tool == "bench" else "tokens/s"
        used = ",".join(sorted({u for _, u, _ in runs}))
        loads = ", ".join(f"{load:.1f}" for _, _, load in runs)
        values = ", ".join(f"{v:g}" for v, _, _ in runs)
        print(f"| {tool} | {busy} | {threads} | {policy or '(unset)'} | {used} | "
              f"{statistics.median(v for v, _, _ in runs):,.1f} {unit} | {values} | {loads} |")  # fmt: skip


if __name__ == "__main__":
    main()
