"""What spreading two CPU workers over loopback nodes costs: one node with two CPUs against three nodes
with one CPU each (the workers then on two nodes), the same tiny run on each.

    python benchmarks/multinode_overhead.py [--iters 200] [--repeats 1]

Each cluster is started with tests/multinode.py (own `ray start` process groups, roots, ports) and
stopped after its runs; each run is the `python -m raygpt.launch` CLI joined to it. Prints a markdown
table: the whole command's wall time (Ray start-up of the run included), the median iteration time that
rank 0 logs (after the first 10 iterations), and the final train/val losses, which must be identical:
the batch order does not depend on where the workers run. All nodes share this machine's cores, so the
figures show Ray's and gloo's cross-node overhead on loopback, not a network's.
"""

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import SHAKESPEARE, TINY_RUN  # noqa: E402
from multinode import start_cluster  # noqa: E402

from raygpt.prep.shakespeare import prepare_shakespeare_char  # noqa: E402

CLUSTERS = {"1 node x 2 CPUs": {"head": 2}, "3 nodes x 1 CPU": {"head": 1, "node-1": 1, "node-2": 1}}


def run_once(cluster, values: dict) -> dict:
    argv = [f"--address={cluster.address}", *(f"--{key}={value}" for key, value in values.items())]
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "raygpt.launch", *argv], env=cluster.driver_env(), capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    steps = [(int(i), float(ms)) for i, ms in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", done.stdout)]
    final = re.findall(r"train loss ([\d.]+), val loss ([\d.]+)", done.stdout)[-1]
    return dict(wall=wall, step_ms=statistics.median(ms for i, ms in steps if i >= 10), losses=final)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raygpt-multinode-bench-"))
    prepare_shakespeare_char(work / "data", input_path=SHAKESPEARE)
    run = {**TINY_RUN, "max_iters": args.iters, "lr_decay_iters": args.iters, "eval_interval": args.iters // 2,
           "log_interval": 1, "num_workers": 2, "cpus_per_worker": 1, "data_dir": work / "data"}  # fmt: skip
    rows = []
    for label, nodes in CLUSTERS.items():
        cluster = start_cluster(nodes)
        try:
            for repeat in range(args.repeats):
                out = work / f"{len(nodes)}-{repeat}"
                result = run_once(cluster, {**run, "out_dir": out, "storage_path": work / "ray"})
                rows.append((label, result))
                print(f"{label}: {result}", file=sys.stderr, flush=True)
        finally:
            cluster.stop()
    print(f"\n{args.iters} iterations, 2 CPU workers (gloo), {TINY_RUN['n_layer']} layers x {TINY_RUN['n_embd']}\n")
    print("| cluster | wall time (s) | median iteration (ms) | final train loss | final val loss |")
    print("|---|---|---|---|---|")
    for label, result in rows:
        train, val = result["losses"]
        print(f"| {label} | {result['wall']:.1f} | {result['step_ms']:.1f} | {train} | {val} |")
    identical = len({result["losses"] for _, result in rows}) == 1
    print(f"\nfinal losses identical across clusters: {identical}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
