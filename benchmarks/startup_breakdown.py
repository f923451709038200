"""Where a run's start-up time goes: from the launch to the training loop's first step, phase by phase.

    python benchmarks/startup_breakdown.py --workers 1 2 --repeats 3            # CPU, this machine
    python benchmarks/startup_breakdown.py --workers 2 --device cuda --repeats 3  # a GPU host (nccl)
    python benchmarks/startup_breakdown.py --workers 1 --env RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2

Each run is `python -m raygpt.launch` of a tiny model (2 layers, 64 wide, block 64, no compile) on random
tokens for 3 iterations, with a Ray of its own (a fresh temp dir: a cold start, as every launch is). The
phases come from three clocks that agree (one machine): the launcher's own lines as they arrive here,
Ray's raylet log (when it spawned each worker process) and core-worker logs (when the process had
imported ray), and Ray Train's controller log, whose DEBUG lines time each step of the worker group's
start (RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING=1 makes the controller write them; nothing else
changes). The table gives each phase's median over --repeats runs, in seconds, appended to --out.

--importtime also sets PYTHONPROFILEIMPORTTIME=1 for the run and lists the slowest imports of the rank 0
training worker process (its stderr log), cumulative, with what each costs the worker.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RAY_READY = re.compile(r"^raygpt: (started a Ray instance|joined the Ray cluster)")
FIT_CALLED = re.compile(r"^raygpt: run '")  # printed just before the trainer is built and fit() called
STARTUP = re.compile(
    r"^start-up ([\d.]+)s: launcher checks and Ray ([\d.]+)s, worker group ([\d.]+)s, model and data ([\d.]+)s, "
    r"first eval and step \(compile\) ([\d.]+)s"
)
# Ray logs: "[2026-11-26 09:23:49,540 I 23918 23918] (raylet) worker_pool.cc:564: Started worker process ..."
RAY_LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
SPAWNED = re.compile(r"Started worker process with pid (\d+) worker_id=([0-9a-f]+)")
WORKER_PIDS = re.compile(r"pid=(\d+)\) world_rank=(\d+)")
CONTROLLER_STEPS = {  # controller DEBUG line -> phase; the seconds are Ray's own measurement
    "placement group": re.compile(r"Placement group ready in ([\d.]+)s"),
    "worker actors created": re.compile(r"worker actors created in ([\d.]+)s"),
    "train context on workers": re.compile(r"Train context initialized on workers in ([\d.]+)s"),
    "after start callbacks (process group)": re.compile(r"after_worker_group_start callbacks completed in ([\d.]+)s"),
    "train fn launched (its imports)": re.compile(r"Train function launched on workers in ([\d.]+)s"),
    "worker group start, Ray's total": re.compile(r"Worker group startup completed in ([\d.]+)s total"),
}
IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")


def ray_log_time(line: str) -> float | None:
    match = RAY_LOG_TIME.match(line)
    if not match:
        return None
    return datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def first_log_time(path: Path) -> float | None:
    with open(path, errors="replace") as lines:
        for line in lines:
            if (at := ray_log_time(line)) is not None:
                return at
    return None


def make_dataset(data_dir: Path) -> None:
    data = data_dir / "random"
    if (data / "val.bin").is_file():
        return
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 200_000), ("val", 20_000)):
        rng.integers(0, 50257, n, dtype=np.uint16).tofile(data / f"{split}.bin")


def launch_command(args, run_dir: Path, workers: int) -> list[str]:
    cpu = args.device == "cpu"
    return [sys.executable, "-m", "raygpt.launch", f"--num_workers={workers}", "--dataset=random",
            f"--data_dir={args.work_dir / 'data'}", f"--out_dir={run_dir / 'out'}",
            f"--storage_path={run_dir / 'ray'}", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64",
            "--bias=False", "--dropout=0.0", "--batch_size=4", f"--gradient_accumulation_steps={workers}",
            "--max_iters=3", "--eval_interval=1000", "--eval_iters=1", "--log_interval=1", "--compile=False",
            f"--device={args.device}", f"--dtype={'float32' if cpu else 'bfloat16'}", "--check_memory=False",
            *(["--cpus_per_worker=1"] if cpu else [])]  # fmt: skip


def run_once(args, workers: int, index: int) -> dict:
    """One launch; returns {phase: seconds} and the rank 0 worker's stderr log (for --importtime)."""
    run_dir = args.work_dir / f"run-{workers}w-{index}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    ray_tmp = tempfile.mkdtemp(prefix="rg-sb-")  # short: Ray's socket paths must be
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(PYTHONUNBUFFERED="1", RAY_TMPDIR=ray_tmp, RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING="1")
    env.update(setting.split("=", 1) for setting in args.env)
    if args.importtime:
        env["PYTHONPROFILEIMPORTTIME"] = "1"
    arrived: dict[str, float] = {}
    startup = None
    started = time.time()
    child = subprocess.Popen(launch_command(args, run_dir, workers), cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)  # fmt: skip
    output = []
    for line in child.stdout:
        now = time.time()
        output.append(line)
        for name, pattern in (("ray ready", RAY_READY), ("fit called", FIT_CALLED)):
            if name not in arrived and pattern.match(line):
                arrived[name] = now
        startup = startup or STARTUP.match(line)
    if child.wait() != 0 or startup is None:
        (run_dir / "launch.log").write_text("".join(output))
        sys.exit(f"the run failed (exit {child.returncode}); its output is in {run_dir / 'launch.log'}")
    logs = Path(ray_tmp) / "ray" / "session_latest" / "logs"
    phases = phases_from_logs(logs, arrived, started, workers)
    total, launcher, group, model, first = (float(x) for x in startup.groups())
    phases.update({"start-up line: launcher checks and Ray": launcher, "start-up line: worker group": group,
                   "start-up line: model and data": model, "start-up line: first eval and step": first,
                   "start-up line: total": total})  # fmt: skip
    rank0_err = next(iter(sorted(logs.glob(f"worker-*-{phases.pop('_rank0_pid')}.err"))), None)
    imports = rank0_err.read_text(errors="replace") if rank0_err else ""
    if not args.keep:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return dict(phases=phases, imports=imports)


def phases_from_logs(logs: Path, arrived: dict, started: float, workers: int) -> dict:
    """The phases of one run from the launcher's lines and the Ray session's logs."""
    spawned = {}  # worker_id -> when the raylet started its process
    for line in (logs / "raylet.out").read_text(errors="replace").splitlines():
        if match := SPAWNED.search(line):
            spawned[match[2]] = (ray_log_time(line), int(match[1]))
    controller_log = next((logs / "train").glob("ray-train-sys-controller-*.log"))
    controller_id = controller_log.stem.rsplit("-", 1)[1]
    records = [json.loads(line) for line in controller_log.read_text().splitlines() if line.strip()]
    controller_first = records[0]["timestamp_ns"] / 1e9
    controller_core = first_log_time(next(logs.glob(f"python-core-worker-{controller_id}_*.log")))
    phases = {
        "launcher start to Ray ready": arrived["ray ready"] - started,
        "Ray ready to fit() (plan, checks)": arrived["fit called"] - arrived["ray ready"],
        "fit() to controller process spawned": spawned[controller_id][0] - arrived["fit called"],
        "controller process: python + import ray": controller_core - spawned[controller_id][0],
        "controller actor init (its imports)": controller_first - controller_core,
    }
    steps = {}
    for record in records:
        for name, pattern in CONTROLLER_STEPS.items():
            if match := pattern.search(record["message"]):
                steps[name] = float(match[1])
        if match := WORKER_PIDS.findall(record["message"]):
            pids = {int(rank): int(pid) for pid, rank in match}
    phases["controller start to placement group asked"] = (
        next(r["timestamp_ns"] for r in records if "Attempting to start" in r["message"]) / 1e9 - controller_first
    )
    spawn_times = {pid: at for at, pid in spawned.values()}
    rank0 = pids[0]
    phases.update(steps)
    ready_at = next(r["timestamp_ns"] for r in records if "Placement group ready" in r["message"]) / 1e9
    if rank0 in spawn_times:
        phases["  of which: rank 0 process spawn wait"] = spawn_times[rank0] - ready_at
        core = first_log_time(next(logs.glob(f"python-core-worker-*_{rank0}.log")))
        phases["  of which: rank 0 python + import ray"] = core - spawn_times[rank0]
    phases["_rank0_pid"] = rank0
    phases["fresh worker processes (all)"] = len(spawned)
    phases["  of which: never given an actor or task"] = len(spawned) - len(used_processes(logs))
    return phases


def used_processes(logs: Path) -> set[str]:
    """The worker ids of the processes that ran an actor or a task (Ray names it in the process's .out log);
    the others were prestarted and left idle."""
    used = set()
    for out in logs.glob("worker-*.out"):
        if re.search(r"^:(actor|task)_name:", out.read_text(errors="replace"), re.MULTILINE):
            used.add(out.name.split("-")[1])
    return used


def slowest_imports(stderr: str, top: int = 15) -> list[str]:
    """The top-level imports (and raygpt's) of a process's -X importtime output, by cumulative time."""
    rows = []
    for line in stderr.splitlines():
        if match := IMPORT_LINE.match(line):
            depth = len(match[3]) // 2
            if depth <= 1 or match[4].startswith("raygpt"):
                rows.append((int(match[2]) / 1e6, depth, match[4]))
    rows.sort(reverse=True)
    return [f"| {name} | {'  ' * depth}{seconds:.2f} |" for seconds, depth, name in rows[:top]]


def table(args, results: dict[int, list[dict]]) -> list[str]:
    counts = list(results)
    names = list(results[counts[0]][0]["phases"])
    lines = [
        f"### Start-up breakdown: {' and '.join(map(str, counts))} {args.device.upper()} worker(s), "
        f"median of {args.repeats}, {where(args)}",
        "",
        f"`python benchmarks/startup_breakdown.py --workers {' '.join(map(str, counts))} --device {args.device} "
        f"--repeats {args.repeats}{''.join(f' --env {e}' for e in args.env)}`, {time.strftime('%Y-%m-%d')}",
        "",
        "| phase (s) | " + " | ".join(f"{n} worker{'s' * (n > 1)}" for n in counts) + " |",
        "| --- |" + " --- |" * len(counts),
    ]
    for name in names:
        cells = []
        for n in counts:
            values = [run["phases"][name] for run in results[n] if name in run["phases"]]
            cells.append(f"{statistics.median(values):.2f}" if values else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def where(args) -> str:
    if args.device == "cpu":
        return f"{os.cpu_count()} cores"
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return gpu.stdout.splitlines()[0] if gpu.stdout else "GPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/raygpt-startup-breakdown"))
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="set in the run's environment (repeatable)")  # fmt: skip
    parser.add_argument("--importtime", action="store_true", help="list the rank 0 worker's slowest imports")
    parser.add_argument("--keep", action="store_true", help="keep each run's Ray temp dir (its logs)")
    parser.add_argument("--out", type=Path, default=Path("startup_breakdown.md"), help="the table is appended here")
    parser.add_argument("--jsonl", type=Path, help="also append each run's phases here, one JSON line a run")
    args = parser.parse_args()
    args.work_dir = args.work_dir.resolve()
    make_dataset(args.work_dir / "data")
    results = {}
    for workers in args.workers:
        results[workers] = []
        for index in range(args.repeats):
            result = run_once(args, workers, index)
            results[workers].append(result)
            if args.jsonl:
                with open(args.jsonl, "a") as out:
                    out.write(json.dumps(dict(workers=workers, env=args.env, **result["phases"])) + "\n")
            group = result["phases"]["start-up line: worker group"]
            print(f"{workers} worker(s), run {index + 1}: worker group {group:.1f}s", flush=True)
    lines = table(args, results)
    if args.importtime:
        last = results[args.workers[-1]][-1]["imports"]
        lines += ["Slowest imports of the rank 0 worker process (cumulative s, last run):", "",
                  "| module | s |", "| --- | --- |", *slowest_imports(last), ""]  # fmt: skip
    with open(args.out, "a") as out:
        out.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
