"""`ray stop` for one node of a test cluster that shares this machine with other Ray instances.

`python tests/stop_ray_node.py TEMP_DIR [--force]` ends the processes whose command line names TEMP_DIR
(the node's `--temp-dir`: its GCS, raylet, agents and Ray workers all do) and every process below them (a
job's driver), by pid: SIGTERM, then SIGKILL for those still there after a grace period (at once with
--force, as `ray stop --force`). The real `ray stop` would end every Ray process of the user on the machine.
"""

import argparse
import re

import psutil

GRACE_S = 10


def node_processes(temp_dir: str) -> list[psutil.Process]:
    """The processes naming temp_dir in their command line, and their descendants; never this process or
    the ones above it (the shell that runs `ray stop`)."""
    this = psutil.Process()
    spared = {this.pid, *(parent.pid for parent in this.parents())}
    names_it = re.compile(re.escape(temp_dir.rstrip("/")) + r"(?![\w.-])")  # not /tmp/x/ray-2 for /tmp/x/ray
    found = {}
    for process in psutil.process_iter(["cmdline"]):
        if any(names_it.search(part) for part in process.info["cmdline"] or ()):
            try:
                for each in (process, *process.children(recursive=True)):
                    found[each.pid] = each
            except psutil.NoSuchProcess:
                pass
    return [process for pid, process in found.items() if pid not in spared]


def stop(temp_dir: str, force: bool = False) -> int:
    processes = node_processes(temp_dir)
    alive = processes
    if not force:
        for process in processes:
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(processes, timeout=GRACE_S)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=GRACE_S)
    print(f"stopped {len(processes)} processes of the Ray node in {temp_dir} ({len(alive)} killed)")
    return len(processes)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("temp_dir", help="the node's --temp-dir, an absolute path")
    parser.add_argument("-f", "--force", action="store_true", help="SIGKILL at once")
    args = parser.parse_args()
    if not args.temp_dir.startswith("/") or len(args.temp_dir) < 8:
        parser.error(f"{args.temp_dir!r} is not a node's temp dir")
    stop(args.temp_dir, args.force)
