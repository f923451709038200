"""Start-up and recovery time: a killed worker's restart, and a Tune sweep's later trials, against a cold start.

    python benchmarks/startup_recovery.py restart --work-dir /tmp/startup --gpus 2
    python benchmarks/startup_recovery.py tune --work-dir /tmp/startup --trials 4
    # the same on CPU with a 2-layer, 64-wide model (block 64): a check of this script
    python benchmarks/startup_recovery.py restart --work-dir /tmp/startup --device cpu --tiny
    python benchmarks/startup_recovery.py tune --work-dir /tmp/startup --device cpu --tiny

restart: `python -m raygpt.launch --num_workers GPUS --max_failures=1` trains GPT-2 124M (12 layers, 768
wide, block 1024, no biases) on random tokens in bf16 with torch.compile under DDP, from a cold start: a
fresh Ray, an empty storage_path (so an empty compile cache) and empty inductor and Triton caches. It
checkpoints every --eval-interval iterations; once Ray has registered a checkpoint and a few more steps
ran, one training worker process is SIGKILLed. The table gives the seconds from the launch to the first
step, from the kill to the restarted workers' "resuming from" line and to their first step, and that last
time over the cold one (the goal: at most 0.25x, and at most 15 s).

tune: `python -m raygpt.tune` sweeps --trials learning rates (a grid, one trial at a time, one GPU
worker each), from the same cold start. Each trial's time is from Tune's "Trial ... started" line to the
trial's first step; trial 1 compiles, trials 2 on should find its graphs in the compile cache (the goal:
each at most 0.25x trial 1).

Every time is taken here, as the child's output lines arrive (PYTHONUNBUFFERED=1); the child's whole
output, each line with its seconds since the launch, is in a log under --work-dir. Each wait has a limit
(--timeout): past it, the run is stopped and the script exits saying what never came. The tables are
appended to --out, with the start-up and compile cache lines the run printed. The run starts its own Ray
(RAY_ADDRESS is dropped), so that the killed worker is one of its own processes and the start is cold.

On one host, the node's own inductor and Triton caches (TORCHINDUCTOR_CACHE_DIR, shared by the run's
processes) serve a restarted worker or a later trial even without the compile cache in Ray storage.
--caches-per-process gives each Ray worker process empty ones of its own, as on a node that never
compiled, so that only Ray storage carries compiled graphs over: what "compile once per cluster" buys.
"""

from __future__ import annotations

import argparse
import atexit
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # n_layer, n_head, n_embd, block_size
    "gpt2": (12, 12, 768, 1024),
    "tiny": (2, 2, 64, 64),
}
ITER = re.compile(r"^iter (\d+): loss")
STARTUP = re.compile(r"^start-up ")
STARTUP_PARTS = re.compile(r"model and data ([\d.]+)s, first eval and step \(compile\) ([\d.]+)s")
COMPILE_CACHE = re.compile(r"^compile cache \S+: (hit|miss)\b.*graphs: ((\d+) cached, (\d+) compiled|none new)")
RESUMING = re.compile(r"^resuming from \S+ at iter (\d+)")
TRIAL_STARTED = re.compile(r"^Trial (\S+) started with configuration")
# Shown as they come and listed under the tables: where the time to a first step went. Ray's controller
# waits up to TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S (30 s) for a failed group's survivors to leave NCCL.
SHOWN = re.compile(rf"{STARTUP.pattern}|{COMPILE_CACHE.pattern}|{RESUMING.pattern}|.*shutdown timed out")
# --caches-per-process: run by every Python process of the run at its start. A Ray worker (its parent, the
# raylet, is no Python process of this run) gets empty inductor and Triton caches of its own, as on a node
# that never compiled; a process it starts itself (torch's compile workers) keeps its parent's.
CACHES_PER_PROCESS = """import os
if os.environ.get("STARTUP_BENCH_CACHES_OF") != str(os.getppid()):
    root = os.path.join(os.environ["STARTUP_BENCH_CACHES"], str(os.getpid()))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, "inductor")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(root, "triton")
os.environ["STARTUP_BENCH_CACHES_OF"] = str(os.getpid())
"""
RESTART_GOAL_RATIO, RESTART_GOAL_S, TRIAL_GOAL_RATIO = 0.25, 15.0, 0.25


class Watched:
    """A command whose output lines are timestamped as they arrive (by a reader thread) and logged."""

    def __init__(self, command: list[str], env: dict, log_path: Path, timeout: float):
        self.log_path, self.timeout = log_path, timeout
        self.started = time.time()
        self.history: list[tuple[float, str]] = []  # (time.time(), line) of every line so far
        self.lines: queue.Queue = queue.Queue()
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, bufsize=1)  # fmt: skip
        atexit.register(self.stop)  # whatever stops this script stops the run too
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        with open(self.log_path, "w") as log:
            for line in self.process.stdout:
                now = time.time()
                log.write(f"{now - self.started:8.2f} {line}")
                log.flush()
                self.lines.put((now, line.rstrip("\n")))
        self.lines.put((time.time(), None))  # the end of the output

    def since_launch(self, at: float) -> float:
        return at - self.started

    def wait_for(self, pattern: re.Pattern | None, what: str, until=None) -> tuple[float, re.Match | None]:
        """The time and match of the next line matching `pattern`, or (now, None) as soon as `until()` holds."""
        deadline = time.time() + self.timeout
        while not (until and until()):
            if time.time() > deadline:
                self.stop()
                sys.exit(f"no {what} within {self.timeout:.0f}s (--timeout); the run is stopped, see {self.log_path}")
            try:
                at, line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                sys.exit(f"the run ended (exit {self.process.wait()}) before {what}; see {self.log_path}")
            self.history.append((at, line))
            if SHOWN.match(line):
                print(f"  [{self.since_launch(at):7.1f}s] {line}", flush=True)
            if pattern and (match := pattern.search(line)):
                return at, match
        return time.time(), None

    def finish(self) -> None:
        """Read the rest of the output; exit with a message unless the run ends well within the limit."""
        deadline = time.time() + self.timeout
        while True:
            try:
                at, line = self.lines.get(timeout=max(0.1, deadline - time.time()))
            except queue.Empty:
                self.stop()
                sys.exit(f"the run did not end within {self.timeout:.0f}s (--timeout); stopped, see {self.log_path}")
            if line is None:
                break
            self.history.append((at, line))
        if self.process.wait() != 0:
            sys.exit(f"the run failed (exit {self.process.returncode}); see {self.log_path}")

    def stop(self) -> None:
        """SIGTERM to the launcher and every process under it (its Ray), SIGKILL to those left after 30 s."""
        if self.process.poll() is not None:
            return
        try:
            launcher = psutil.Process(self.process.pid)
            left = [launcher, *launcher.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for process in left:
                try:
                    process.send_signal(sig)  # psutil checks it is still the same process
                except psutil.NoSuchProcess:
                    pass
            _, left = psutil.wait_procs(left, timeout=30)
            if not left:
                return

    def lines_between(self, start: float, end: float, pattern: re.Pattern) -> list[tuple[float, str]]:
        return [(at, line) for at, line in self.history if start <= at < end and pattern.match(line)]


def training_workers(launcher_pid: int) -> list[psutil.Process]:
    """The run's Ray Train worker processes: Ray titles them ray::RayTrainWorker..., and this run's Ray was
    started by its launcher, so they are among its descendants (other Ray clusters on the machine are not).
    A process a worker forked carries the same title: only those whose parent is not a worker count."""

    def is_worker(process: psutil.Process) -> bool:
        try:
            return any("RayTrainWorker" in part for part in process.cmdline())
        except psutil.Error:
            return False

    workers = [p for p in psutil.Process(launcher_pid).children(recursive=True) if is_worker(p)]
    pids = {p.pid for p in workers}
    return [p for p in workers if p.ppid() not in pids]


def prepare(args, name: str) -> tuple[Path, dict]:
    """A fresh folder for this measurement, the random-token dataset, and an environment with empty
    compile caches and a Ray of its own."""
    run_dir = args.work_dir / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    data = args.work_dir / "data" / "random"
    train_tokens = 1_000_000 if args.tiny else 20_000_000
    if not (data / "train.bin").is_file() or (data / "train.bin").stat().st_size != 2 * train_tokens:
        data.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for split, n in (("train", train_tokens), ("val", train_tokens // 20)):
            rng.integers(0, 50257, n, dtype=np.uint16).tofile(data / f"{split}.bin")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0", RAY_TMPDIR=args.ray_tmp,
               TORCHINDUCTOR_CACHE_DIR=str(run_dir / "inductor"), TRITON_CACHE_DIR=str(run_dir / "triton"))  # fmt: skip
    env.update(setting.split("=", 1) for setting in args.env)
    if args.caches_per_process:
        site = run_dir / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(CACHES_PER_PROCESS)
        env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")])),
                   STARTUP_BENCH_CACHES=str(run_dir / "caches"))  # fmt: skip
    return run_dir, env


def run_keys(args, run_dir: Path, workers: int) -> list[str]:
    """The config keys both measurements share: the model, random tokens, early and frequent checkpoints."""
    n_layer, n_head, n_embd, block_size = SHAPES["tiny" if args.tiny else "gpt2"]
    on_cpu = args.device == "cpu"
    return [f"--num_workers={workers}", "--dataset=random", f"--data_dir={args.work_dir / 'data'}",
            f"--out_dir={run_dir / 'out'}", f"--storage_path={run_dir / 'ray'}", f"--n_layer={n_layer}",
            f"--n_head={n_head}", f"--n_embd={n_embd}", f"--block_size={block_size}", "--bias=False",
            "--dropout=0.0", f"--batch_size={args.batch_size or (4 if args.tiny else 12)}",
            f"--gradient_accumulation_steps={workers}", f"--max_iters={args.iters}",
            f"--eval_interval={args.eval_interval}", "--eval_iters=2", "--log_interval=1", "--warmup_iters=5",
            f"--lr_decay_iters={args.iters * 10}", "--always_save_checkpoint=True", "--compile=True",
            f"--dtype={'float32' if on_cpu else 'bfloat16'}", f"--device={args.device}", "--check_memory=False",
            *(["--cpus_per_worker=1"] if on_cpu else [])]  # fmt: skip


def measure_restart(args) -> dict:
    run_dir, env = prepare(args, "restart")
    command = [sys.executable, "-m", "raygpt.launch", *run_keys(args, run_dir, args.gpus), "--max_failures=1"]
    run = Watched(command, env, run_dir / "restart.log", args.timeout)
    print(f"restart: {' '.join(command[1:])}\n  log: {run.log_path}", flush=True)
    first_step, _ = run.wait_for(ITER, "first training step")
    cold_s = run.since_launch(first_step)
    print(f"cold start: first step {cold_s:.1f}s after the launch", flush=True)
    # A reported checkpoint counts for a restart once Ray's controller has registered it in storage.
    snapshot = run_dir / "ray" / "out" / "checkpoint_manager_snapshot.json"
    run.wait_for(None, "a checkpoint registered by Ray",
                 until=lambda: snapshot.is_file() and "checkpoint_" in snapshot.read_text())  # fmt: skip
    for _ in range(3):
        _, last = run.wait_for(ITER, "a step after the checkpoint")
    if int(last[1]) > args.iters - 10:
        run.stop()
        sys.exit(f"iteration {last[1]} of {args.iters} before the kill: too close to the end, raise --iters")
    workers = training_workers(run.process.pid)
    if len(workers) != args.gpus:
        run.stop()
        sys.exit(f"found {len(workers)} Ray Train worker processes under the launcher, expected {args.gpus}")
    victim = max(workers, key=lambda p: p.pid)
    victim.kill()  # SIGKILL
    killed = time.time()
    print(f"killed training worker pid {victim.pid} at iter {last[1]} ({run.since_launch(killed):.1f}s)", flush=True)
    resumed, match = run.wait_for(RESUMING, "'resuming from' line after the kill")
    resumed_iter = int(match[1])
    restarted, _ = run.wait_for(ITER, "first step after the restart")
    print(f"restart: resuming {resumed - killed:.1f}s, first step {restarted - killed:.1f}s after the kill", flush=True)
    run.finish()
    return dict(cold_s=cold_s, resume_s=resumed - killed, restart_s=restarted - killed, killed_iter=int(last[1]),
                resumed_iter=resumed_iter, lines=startup_lines(run, run.started, float("inf")))  # fmt: skip


def startup_lines(run: Watched, start: float, end: float) -> list[str]:
    return [line for _, line in run.lines_between(start, end, SHOWN)]


def measure_tune(args) -> list[dict]:
    run_dir, env = prepare(args, "tune")
    rates = ",".join(f"{6e-4 * 1.5**k:.2e}" for k in range(args.trials))
    command = [sys.executable, "-m", "raygpt.tune", *run_keys(args, run_dir, 1), f"--learning_rate=grid:{rates}",
               "--max-concurrent", "1"]  # fmt: skip
    run = Watched(command, env, run_dir / "tune.log", args.timeout)
    print(f"tune: {' '.join(command[1:])}\n  log: {run.log_path}", flush=True)
    trials = []
    for number in range(1, args.trials + 1):
        started, match = run.wait_for(TRIAL_STARTED, f"start of trial {number}")
        first_step, _ = run.wait_for(ITER, f"first step of trial {number}")
        trials.append(dict(name=match[1], started=started, first_step_s=first_step - started))
        print(f"trial {number} ({match[1]}): first step {first_step - started:.1f}s after its start", flush=True)
    run.finish()
    ends = [trial["started"] for trial in trials[1:]] + [float("inf")]
    for trial, end in zip(trials, ends):
        trial["lines"] = startup_lines(run, trial["started"], end)
    return trials


def where(args) -> str:
    if args.device == "cpu":
        return f"CPU ({os.cpu_count()} cores)"
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return gpu.stdout.splitlines()[0] if gpu.stdout else "GPU"


def describe_model(args) -> str:
    n_layer, _, n_embd, block_size = SHAPES["tiny" if args.tiny else "gpt2"]
    name = "tiny GPT" if args.tiny else "GPT-2 124M"
    precision = "float32" if args.device == "cpu" else "bf16"
    return (
        f"{name} ({n_layer} layers, {n_embd} wide, block {block_size}, no biases), {precision}, compile, random tokens"
    )


def command_line(args) -> str:
    """The measurement's command (without the paths) and the date, for the table's caption."""
    count = f"--gpus {args.gpus}" if args.measurement == "restart" else f"--trials {args.trials}"
    flags = [
        " --tiny" * args.tiny,
        " --caches-per-process" * args.caches_per_process,
        *(f" --env {e}" for e in args.env),
    ]
    return (f"`python benchmarks/startup_recovery.py {args.measurement} {count} --device {args.device}{''.join(flags)} "
            f"--iters {args.iters} --eval-interval {args.eval_interval}`, {time.strftime('%Y-%m-%d')}")  # fmt: skip


def restart_table(args, result: dict) -> list[str]:
    ratio = result["restart_s"] / result["cold_s"]
    met = ratio <= RESTART_GOAL_RATIO and result["restart_s"] <= RESTART_GOAL_S
    return [
        f"### Killed worker to first step: {args.gpus} x {where(args)}, DDP, {describe_model(args)}",
        "",
        f"{command_line(args)}. One worker SIGKILLed at iter {result['killed_iter']}; the restart resumed at iter "
        f"{result['resumed_iter']}.",
        "",
        "| cold: launch to first step (s) | kill to 'resuming from' (s) | kill to first step (s) | "
        f"restart / cold | goal (<= {RESTART_GOAL_RATIO}x and <= {RESTART_GOAL_S:.0f} s) |",
        "| --- | --- | --- | --- | --- |",
        f"| {result['cold_s']:.1f} | {result['resume_s']:.1f} | {result['restart_s']:.1f} | {ratio:.2f}x | "
        f"{'met' if met else 'not met'} |",
        "",
        "What the run printed (the cold start, then the restart):",
        "",
        *(f"    {line}" for line in result["lines"]),
        "",
    ]


def tune_table(args, trials: list[dict]) -> list[str]:
    first = trials[0]["first_step_s"]
    later = [trial["first_step_s"] for trial in trials[1:]]
    rows = []
    for number, trial in enumerate(trials, 1):
        parts = next((STARTUP_PARTS.search(line) for line in trial["lines"] if STARTUP.match(line)), None)
        cache = next((COMPILE_CACHE.match(line) for line in trial["lines"] if COMPILE_CACHE.match(line)), None)
        cached = f"{cache[1]}, {cache[2]}" if cache else "off"
        rows.append(f"| {number} ({trial['name']}) | {trial['first_step_s']:.1f} | "
                    f"{trial['first_step_s'] / first:.2f}x | {parts[1] if parts else '?'} | "
                    f"{parts[2] if parts else '?'} | {cached} |")  # fmt: skip
    worst = max(later) / first if later else float("nan")
    return [
        f"### Tune trials, start to first step: 1 x {where(args)} a trial, {describe_model(args)}",
        "",
        f"{command_line(args)}. A trial's time runs from Tune's 'Trial ... started' line to its first step; the "
        "two parts are from its own start-up line.",
        "",
        "| trial | start to first step (s) | / trial 1 | model and data (s) | first eval and step, compile (s) | "
        "compile cache |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Trial 1: {first:.1f} s; trials 2-{len(trials)}: median {statistics.median(later):.1f} s, worst "
        f"{max(later):.1f} s = {worst:.2f}x trial 1 (goal <= {TRIAL_GOAL_RATIO}x: "
        f"{'met' if worst <= TRIAL_GOAL_RATIO else 'not met'}).",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measurement", choices=("restart", "tune"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/raygpt-startup"))
    parser.add_argument("--gpus", type=int, default=2, help="restart: training workers (GPUs, or CPU workers)")
    parser.add_argument("--trials", type=int, default=4, help="tune: learning rates swept, one trial each")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model with block 64 (for CPU)")
    parser.add_argument("--batch-size", type=int, default=0, help="micro-batch per worker (default: 12, tiny 4)")
    parser.add_argument("--iters", type=int, default=0, help="max_iters (default: restart 300, tiny 100; tune 20)")
    parser.add_argument("--eval-interval", type=int, default=0, help="checkpoint every (default: restart 20, tune 10)")
    parser.add_argument("--caches-per-process", action="store_true",
                        help="each Ray worker starts with empty inductor and Triton caches, as on a new node: only "
                        "the compile cache in Ray storage carries graphs from one process to the next")  # fmt: skip
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="set in the run's environment, which all its Ray processes inherit (repeatable), e.g. "
                        "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S=5")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=900, help="seconds any one wait may take")
    parser.add_argument("--out", type=Path, default=Path("startup_recovery.md"), help="tables are appended here")
    args = parser.parse_args()
    if bad := [setting for setting in args.env if "=" not in setting]:
        parser.error(f"--env takes KEY=VALUE, got {bad[0]!r}")
    restart = args.measurement == "restart"
    args.iters = args.iters or ((100 if args.tiny else 300) if restart else 20)
    args.eval_interval = args.eval_interval or (20 if restart else 10)
    args.work_dir = args.work_dir.resolve()
    args.ray_tmp = tempfile.mkdtemp(prefix="rg-ray-")  # this run's own Ray; short: Ray's socket paths must be
    try:
        table = restart_table(args, measure_restart(args)) if restart else tune_table(args, measure_tune(args))
    finally:
        shutil.rmtree(args.ray_tmp, ignore_errors=True)
    with open(args.out, "a") as out:
        out.write("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
