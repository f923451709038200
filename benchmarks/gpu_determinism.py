"""Are two GPU runs bit-identical, and is a run whose worker was killed? With and without --deterministic=True.

    python benchmarks/gpu_determinism.py [--work-dir DIR] [--out TABLE.md] [--log-dir DIR]
    python benchmarks/gpu_determinism.py --cpu-smoke   # the same steps, tiny model, 2 CPU workers (gloo)

Two workers (one per GPU, DDP over NCCL) train GPT-2 124M (configs/train_gpt2.py: 12 x 768, block 1024,
bias False, vocab 50304, dropout 0, bf16, compile) on random tokens: micro-batch 8, gradient accumulation
2 over both workers, 80 iterations (warmup 5, lr_decay_iters 800), an eval (2 batches a split) and a
checkpoint at iters 40 and 80. Five runs, one after the other, each its own `python -m raygpt.launch`
(embedded Ray instance, its own out_dir and Ray run):

  det-1, det-2    --deterministic=True, each with its own empty compile cache (two clean runs)
  det-kill        --deterministic=True --max_failures=1, det-1's compile cache (a restart on the same
                  machine finds what the run compiled): once Ray's checkpoint_manager_snapshot.json
                  names the iter-40 checkpoint, the rank-1 RayTrainWorker process is SIGKILLed; Ray
                  restarts the worker group, which resumes from that checkpoint
  plain-1, plain-2  without --deterministic; plain-2 reuses plain-1's compile cache

The table: the largest absolute difference between the final weights (out_dir/ckpt.pt, "model") of
det-1 and det-2, det-kill and det-1, plain-1 and plain-2; and the median ms/iter (iterations 10 and on,
from the `iter N: ... time X ms` lines) with and without --deterministic, as tokens/s and a ratio.
Each run's output goes to LOG_DIR/<run>.log; a run that fails is reported with its log's last lines.
det-kill runs with --verbose, so that rank 0's lines carry its pid ("(RayTrainWorker pid=N)") and the
other worker is rank 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ITER_LINE = re.compile(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms")
RANK0_PID = re.compile(r"RayTrainWorker pid=(\d+).*iter \d+:")
RESUMED = re.compile(r"resuming from (\S+) at iter (\d+)")
SNAPSHOT = "checkpoint_manager_snapshot.json"

MODEL_GPU = [
    "--n_layer=12",
    "--n_head=12",
    "--n_embd=768",
    "--block_size=1024",
    "--bias=False",
    "--dropout=0.0",
    "--dtype=bfloat16",
    "--compile=True",
    "--batch_size=8",
]
MODEL_CPU = [  # --cpu-smoke: the script's logic in a minute on two cores
    "--device=cpu",
    "--n_layer=2",
    "--n_head=2",
    "--n_embd=64",
    "--block_size=64",
    "--dropout=0.0",
    "--dtype=float32",
    "--compile=False",
    "--batch_size=4",
    "--cpus_per_worker=1",
]
COMMON = [
    "--wandb_log=False",
    "--gradient_accumulation_steps=2",
    "--max_iters=80",
    "--warmup_iters=5",
    "--lr_decay_iters=800",
    "--eval_interval=40",
    "--eval_iters=2",
    "--log_interval=1",
    "--always_save_checkpoint=True",
    "--num_workers=2",
]
TOKENS_PER_ITER = {"gpu": 8 * 1024 * 2, "cpu": 4 * 64 * 2}


def write_data(data_dir: Path) -> None:
    """Random GPT-2 token ids, no meta.json: the model gets the padded GPT-2 vocabulary (50304)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 10_000_000), ("val", 1_000_000)):
        rng.integers(0, 50257, n, dtype=np.uint16).tofile(data_dir / f"{split}.bin")


def train_workers() -> set[int]:
    """Pids of the Ray Train worker processes on this machine (Ray titles them ray::RayTrainWorker...)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if cmdline.startswith(b"ray::RayTrainWorker"):
            pids.add(int(entry))
    return pids


class Run:
    """One `python -m raygpt.launch` in its own process group; its output goes to a log and to `lines`."""

    def __init__(self, name: str, command: list[str], env: dict, log_path: Path):
        self.name, self.log_path, self.lines = name, log_path, []
        self.start = time.time()
        self.workers_before = train_workers()  # a finished run's workers may still be exiting
        self.log = open(log_path, "w")
        self.log.write("$ " + " ".join(command) + "\n")
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.log.write(f"{time.time() - self.start:8.2f} {line}")
            self.log.flush()
            self.lines.append(line)

    def note(self, text: str) -> None:
        print(f"[{self.name}] {text}", flush=True)
        self.log.write(f"{time.time() - self.start:8.2f} [gpu_determinism.py] {text}\n")
        self.log.flush()

    def last_iter(self) -> int | None:
        for line in reversed(self.lines):
            if match := ITER_LINE.search(line):
                return int(match.group(1))
        return None

    def wait(self, timeout: float) -> int:
        try:
            code = self.process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            self.note(f"still running after {timeout:.0f} s: killing its process group")
            os.killpg(self.process.pid, signal.SIGKILL)
            code = self.process.wait()
        self.reader.join(timeout=10)
        self.log.close()
        return code


def kill_rank1_after_checkpoint(run: Run, run_dir: Path, deadline: float) -> dict:
    """Once Ray has registered a checkpoint (its snapshot names one), SIGKILL the rank-1 worker."""
    snapshot = run_dir / SNAPSHOT
    while not (snapshot.is_file() and "checkpoint_" in snapshot.read_text(errors="replace")):
        if run.process.poll() is not None or time.time() > deadline:
            run.note("no checkpoint was registered while the run was alive: nothing killed")
            return {"killed": None}
        time.sleep(0.05)
    registered_at = run.last_iter()
    rank0 = next((int(m.group(1)) for line in run.lines if (m := RANK0_PID.search(line))), None)
    candidates = sorted(train_workers() - run.workers_before - {rank0})
    if rank0 is None or len(candidates) != 1:
        run.note(f"cannot tell rank 1 apart (rank 0 pid {rank0}, other workers {candidates}): nothing killed")
        return {"killed": None}
    pid = candidates[0]
    os.kill(pid, signal.SIGKILL)
    run.note(f"checkpoint registered (last logged iter {registered_at}); SIGKILLed rank 1, pid {pid} (rank 0: {rank0})")
    return {"killed": pid, "rank0": rank0, "last_iter_at_kill": run.last_iter()}


def median_ms(lines: list[str]) -> float | None:
    times = [float(m.group(2)) for line in lines if (m := ITER_LINE.search(line)) and int(m.group(1)) >= 10]
    return statistics.median(times) if times else None


def final_state(out_dir: Path) -> dict | None:
    import torch

    path = out_dir / "ckpt.pt"
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def max_abs_diff(a: dict | None, b: dict | None) -> tuple[float, int, int] | None:
    """Largest |a - b| over the model's tensors, the number of tensors that differ at all, and their count."""
    import torch

    if a is None or b is None:
        return None
    worst, differing = 0.0, 0
    for key, tensor in a["model"].items():
        other = b["model"][key]
        if not torch.equal(tensor, other):
            differing += 1
            worst = max(worst, (tensor.float() - other.float()).abs().max().item())
    return worst, differing, len(a["model"])


def tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/raygpt-determinism"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/raygpt-determinism/gpu_determinism.md"))
    parser.add_argument("--log-dir", type=Path, help="where the run logs go (default: --work-dir)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on 2 CPU workers: checks the script")
    parser.add_argument("--budget-s", type=float, default=560, help="start no run after this many seconds")
    args = parser.parse_args()
    mode = "cpu" if args.cpu_smoke else "gpu"
    work, logs = args.work_dir, args.log_dir or args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    logs.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_data(work / "data" / "random")
    began = time.time()

    import torch

    device = torch.cuda.get_device_name() if mode == "gpu" else "CPU"
    gpus = torch.cuda.device_count() if mode == "gpu" else 0
    print(f"device: {device} x {gpus}, torch {torch.__version__}", flush=True)

    runs = [  # (name, extra args, compile cache): the determinism questions first, in case time runs out
        ("det-1", ["--deterministic=True"], "det-1"),
        ("det-kill", ["--deterministic=True", "--max_failures=1", "--verbose"], "det-1"),
        ("det-2", ["--deterministic=True"], "det-2"),
        ("plain-1", [], "plain"),
        ("plain-2", [], "plain"),
    ]
    results: dict[str, dict] = {}
    for name, extra, cache in runs:
        left = args.budget_s - (time.time() - began)
        if left < 60:
            print(f"[{name}] not run: {left:.0f} s of the budget left", flush=True)
            results[name] = {"status": "not run (time budget)"}
            continue
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "TORCHINDUCTOR_CACHE_DIR": str(work / f"cache-{cache}" / "inductor"),
            "TRITON_CACHE_DIR": str(work / f"cache-{cache}" / "triton"),
        }
        command = [
            sys.executable,
            "-m",
            "raygpt.launch",
            "configs/train_gpt2.py",
            *(MODEL_GPU if mode == "gpu" else MODEL_CPU),
            *COMMON,
            "--dataset=random",
            f"--data_dir={work / 'data'}",
            f"--out_dir={work / f'out-{name}'}",
            f"--storage_path={work / 'ray'}",
            *extra,
        ]
        run = Run(name, command, env, logs / f"{name}.log")
        print(f"[{name}] started: {' '.join(extra) or 'defaults'}", flush=True)
        kill = {}
        if "--max_failures=1" in extra:
            kill = kill_rank1_after_checkpoint(run, work / "ray" / f"out-{name}", began + args.budget_s)
        code = run.wait(began + args.budget_s + 30 - time.time())
        resumed = [(m.group(1), int(m.group(2))) for line in run.lines if (m := RESUMED.search(line))]
        ms = median_ms(run.lines)
        results[name] = {
            "status": "ok" if code == 0 else f"exit {code}",
            "wall_s": round(time.time() - run.start, 1),
            "median_ms": ms,
            "last_iter": run.last_iter(),
            "resumed": resumed,
            **kill,
        }
        print(f"[{name}] {json.dumps(results[name])}", flush=True)
        if code != 0:
            print(f"[{name}] failed; the end of {run.log_path}:\n{tail(run.log_path)}", flush=True)

    states = {name: final_state(work / f"out-{name}") for name in results}

    def diff_cell(a: str, b: str) -> str:
        diff = max_abs_diff(states[a], states[b])
        if diff is None:
            return f"n/a ({a}: {results[a]['status']}, {b}: {results[b]['status']})"
        worst, differing, total = diff
        return f"{worst:.3g} ({differing} of {total} tensors differ)" if differing else "0.0 (bit-identical)"

    def iters(*names: str) -> str:
        return ", ".join(f"{n}: {states[n]['iter_num'] if states[n] else 'none'}" for n in names)

    kill = results["det-kill"]
    resumed = kill.get("resumed") or []
    restart = (
        f"rank 1 (pid {kill['killed']}) SIGKILLed after iter {kill['last_iter_at_kill']}; "
        + (f"resumed at iter {resumed[-1][1]} from {Path(resumed[-1][0]).parent.name}" if resumed else "no resume line")
        if kill.get("killed")
        else "no worker killed"
    )
    rows = [
        "| case | runs (final iter) | max abs weight difference | notes |",
        "| --- | --- | --- | --- |",
        f"| (a) two clean runs, default kernels | {iters('plain-1', 'plain-2')} | {diff_cell('plain-1', 'plain-2')} "
        "| plain-2 reused plain-1's compile cache |",
        f"| (b) two clean runs, --deterministic=True | {iters('det-1', 'det-2')} | {diff_cell('det-1', 'det-2')} "
        "| each its own empty compile cache |",
        f"| (c) --deterministic=True, --max_failures=1, worker killed, vs det-1 | {iters('det-kill', 'det-1')} "
        f"| {diff_cell('det-kill', 'det-1')} | {restart} |",
    ]
    speed = {
        label: [results[n]["median_ms"] for n in names if results[n].get("median_ms")]
        for label, names in (("plain", ("plain-1", "plain-2")), ("det", ("det-1", "det-2")))
    }
    cost = ["", "| kernels | median ms/iter (per run) | tokens/s | vs default |", "| --- | --- | --- | --- |"]
    base = statistics.mean(speed["plain"]) if speed["plain"] else None
    for label, text in (("plain", "default"), ("det", "--deterministic=True")):
        if not speed[label]:
            cost.append(f"| {text} | n/a | n/a | n/a |")
            continue
        ms = statistics.mean(speed[label])
        tokens = TOKENS_PER_ITER[mode] / (ms / 1000)
        ratio = f"{ms / base:.3f}x time, {base / ms:.3f}x tokens/s" if base else "n/a"
        each = ", ".join(f"{m:.2f}" for m in speed[label])
        cost.append(f"| (d) {text} | {ms:.2f} ({each}) | {tokens:,.0f} | {ratio} |")
    header = (
        f"{device} x {gpus}, torch {torch.__version__}, {mode} mode, "
        f"{time.strftime('%Y-%m-%d')}; command: `python benchmarks/gpu_determinism.py"
        f"{' --cpu-smoke' if args.cpu_smoke else ''}`\n\n"
    )
    table = header + "\n".join(rows + cost) + "\n"
    args.out.write_text(table)
    (logs / "gpu_determinism.json").write_text(json.dumps({"device": device, "gpus": gpus, "runs": results}, indent=1))
    print(table, flush=True)


if __name__ == "__main__":
    main()
