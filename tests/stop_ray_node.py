"""`ray stop` for one node of a test cluster that shares this machine with other Ray instances.

`python tests/stop_ray_node.py NODE_HOME [--force]` ends the node's processes, by pid: those whose command
line or environment names NODE_HOME (the home folder the node's SSH sessions log in to; every process Ray
starts there inherits HOME, and most name their --temp-dir below it), and every process below them (a
job's driver). SIGTERM, then SIGKILL for those still there after a grace period (at once with --force, as
`ray stop --force`). The real `ray stop` would end every Ray process of the user on the machine.
"""

import argparse
import re

import psutil

GRACE_S = 10


def names(folder: str):
    """A test for a string naming folder or a path below it (not /tmp/x/head-2 for /tmp/x/head)."""
    return re.compile(re.escape(folder.rstrip("/")) + r"(?![\w.-])").search


def mentions(process: psutil.Process, named) -> bool:
    try:
        return any(named(part) for part in process.cmdline()) or any(named(v) for v in process.environ().values())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def node_processes(folder: str) -> list[psutil.Process]:
    """The processes naming folder, and their descendants; never this process or the ones above it (the
    shell that runs `ray stop`, the SSH session it runs in)."""
    this = psutil.Process()
    spared = {this.pid, *(parent.pid for parent in this.parents())}
    named, found = names(folder), {}
    for process in psutil.process_iter():
        if process.pid not in spared and mentions(process, named):
            try:
                for each in (process, *process.children(recursive=True)):
                    found[each.pid] = each
            except psutil.NoSuchProcess:
                pass
    return [process for pid, process in found.items() if pid not in spared]


def stop(folder: str, force: bool = False) -> int:
    processes = node_processes(folder)
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
    print(f"stopped {len(processes)} processes of the Ray node in {folder} ({len(alive)} killed)")
    return len(processes)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="the node's home folder, an absolute path")
    parser.add_argument("-f", "--force", action="store_true", help="SIGKILL at once")
    args = parser.parse_args()
    if not args.folder.startswith("/") or args.folder.rstrip("/").count("/") < 2:
        parser.error(f"{args.folder!r} is not a node's folder")
    stop(args.folder, args.force)
