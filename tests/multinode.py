"""A Ray cluster of several nodes on loopback, for tests that need workers on different nodes.

Each node is one `ray start --block` process and everything it starts (GCS, raylet, the workers), in a
process group of its own, so a test can kill a whole node and the fixture stops exactly what it started
(never `ray stop`: it would stop every Ray on the machine). Each node has its own root folder for Ray's
temp files, TMPDIR and its dataset cache (RAYGPT_DATA_CACHE), its own ports, and a custom resource
named after it. The cluster has its own authentication token, so it neither reads nor writes ~/.ray, and
its address file lives in the head's root, so a plain `ray.init()` elsewhere never joins it.
Ray gives every node this machine's own address (it replaces 127.0.0.1 by it): no traffic leaves the host.
Nothing here calls ray.init: drivers are subprocesses (`python -m raygpt.launch --address ...`).
All nodes share this machine's disk, so with `watch` folders every Python process of the cluster logs the
files it reads and writes there, and cross_node_reads names what one machine read that another wrote.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))
# Worker ports: above the 10002-19999 that the session's `ray_local` cluster takes by default, below
# Linux's ephemeral range (32768+) where Ray's randomly chosen ports land.
WORKER_PORTS = range(20000, 32000)
PORTS_PER_NODE = 200
START_TIMEOUT_S = 180
# On a loaded 2-core machine a node's dashboard agent can take longer to start than the raylet waits
# for it by default (then the raylet aborts): wait longer.
NODE_SETTINGS = {"RAY_agent_register_timeout_ms": "120000", "RAY_raylet_start_wait_time_s": "120"}
# A killed node is declared dead after about 3 missed 1 s health checks (Ray's default: about 30 s).
HEAD_SETTINGS = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


# What rank 0 writes of a run's history, each node its own (README: metrics.jsonl, TensorBoard). A restarted
# rank 0 reads the copy in its out_dir to continue it without duplicates: where out_dir is shared (as here)
# that is the first node's, on a cluster of own disks none; no result depends on it.
PER_NODE_HISTORY = {"metrics.jsonl"}


# Every Python process of a node (Ray's workers included, through PYTHONPATH) and the drivers log which
# files under the watched folders they open to read or write (`open`, and renames and links onto a path),
# one line a file event: time, kind, pid, path. C++ file access (pyarrow, Ray's own) is not seen.
FILE_AUDIT = """\
import os
import sys
import time

LOG = os.environ.get("RAYGPT_FILE_AUDIT_LOG")
WATCHED = tuple(p for p in os.environ.get("RAYGPT_FILE_AUDIT_WATCH", "").split(os.pathsep) if p)
WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
busy = False


def record(kind, path):
    path = os.path.abspath(os.fsdecode(path))
    if path.startswith(WATCHED):
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, f"{time.time():.6f}\\t{kind}\\t{os.getpid()}\\t{path}\\n".encode())
        os.close(fd)


def hook(event, args):
    global busy
    if busy or event not in ("open", "os.rename", "os.link"):
        return
    busy = True
    try:
        if event == "open" and not isinstance(args[0], int):
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if mode is not None else bool(flags & WRITING)
            record("write" if writes else "read", path)
        elif event != "open":
            record("write", args[1])
    except Exception:
        pass
    finally:
        busy = False


if LOG and WATCHED:
    sys.addaudithook(hook)
"""
AUDIT_LOG = "file-audit.log"


# Ports handed out here: nodes start together, so a port one was given may not be bound yet when the
# next one asks; none is handed out twice.
handed_out: set[int] = set()


def free_port() -> int:
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in handed_out:
            handed_out.add(port)
            return port


def free_port_range(count: int) -> range:
    """`count` consecutive ports in WORKER_PORTS that nothing listens on now (checked by binding each)
    and that no other node was given."""
    for _ in range(100):
        start = random.randrange(WORKER_PORTS.start, WORKER_PORTS.stop - count)
        ports = range(start, start + count)
        if handed_out.intersection(ports):
            continue
        try:
            for port in ports:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        handed_out.update(ports)
        return ports
    raise RuntimeError(f"no {count} free consecutive ports in {WORKER_PORTS}")


@dataclass
class Node:
    name: str  # also its custom resource: {name: 1}
    root: Path
    process: subprocess.Popen  # `ray start --block`, the leader of the node's process group

    @property
    def data_cache(self) -> Path:
        return self.root / "data-cache"

    @property
    def log(self) -> Path:
        return self.root / "ray-start.log"

    def alive(self) -> bool:
        return self.process.poll() is None

    def processes(self) -> list[psutil.Process]:
        """`ray start` and everything below it: the raylet, the agents, the workers the raylet started."""
        try:
            parent = psutil.Process(self.process.pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """The whole node at once, as a machine that loses power: its raylet, its workers, (head) its GCS.
        Its process group, and any process below it that left the group."""
        below = self.processes()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for process in below:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.process.wait()
        psutil.wait_procs(below, timeout=30)  # gone, not dying, before anyone removes the node's files


@dataclass
class LoopbackCluster:
    root: Path  # every node's root is a folder below it
    address: str  # the head's GCS, host:port
    nodes: dict[str, Node]  # by name: "head", "node-1", ...
    auth_env: dict[str, str]  # what a driver needs to be let in
    watched: tuple[str, ...] = ()  # folders whose files' readers and writers are logged

    def driver_env(self, **extra: str) -> dict[str, str]:
        """The environment for a driver subprocess (the launcher) joining this cluster: it runs on the
        head's machine, so its file events count as the head's."""
        head = next(iter(self.nodes.values()))
        return {**session_env(), **self.auth_env, **audit_env(self.root, head.root, self.watched),
                "RAY_ADDRESS": self.address, "PYTHONUNBUFFERED": "1", **extra}  # fmt: skip

    def cross_node_reads(self, under: list[Path]) -> list[str]:
        """Files under `under` that a machine read while another machine had written them last: what a
        cluster whose nodes have their own disks could not do. A machine is a node's root (a replaced
        node is a new machine); the head's includes the drivers."""
        events = []
        for log in self.root.glob(f"*/{AUDIT_LOG}"):
            for line in log.read_text().splitlines():
                when, kind, _, path = line.split("\t", 3)
                if path.startswith(tuple(str(folder) for folder in under)):
                    events.append((float(when), kind, path, log.parent.name))
        last_writer, found = {}, []
        for _, kind, path, machine in sorted(events):
            if Path(path).name in PER_NODE_HISTORY or "/tensorboard/" in path:
                continue
            if kind == "write":
                last_writer[path] = machine
            elif last_writer.get(path, machine) != machine:
                found.append(f"{path} read on {machine}, written on {last_writer[path]}")
        return found

    def stop(self) -> None:
        for node in reversed(list(self.nodes.values())):  # workers before the head
            node.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def replace(self, name: str, cpus: int = 1) -> Node:
        """A new machine in place of node `name` (killed): a fresh root, an empty data cache."""
        old = self.nodes[name]
        old.kill()
        folder = f"{name}-{len(list(self.root.glob(name + '*')))}"
        fresh = start_node(self.root, folder, cpus, self.auth_env, self.address, name, self.watched)
        self.nodes[name] = fresh
        return fresh


def start_node(
    cluster_root: Path,
    folder: str,
    cpus: int,
    auth_env: dict,
    head_address: str | None = None,
    name: str = "",
    watched: tuple[str, ...] = (),
) -> Node:
    """One node, rooted at cluster_root/folder, named `name` (default: the folder's name), once it is up."""
    node = launch_node(cluster_root, folder, cpus, auth_env, head_address, name, watched)
    wait_until_started(node)
    return node


def launch_node(
    cluster_root: Path,
    folder: str,
    cpus: int,
    auth_env: dict,
    head_address: str | None = None,
    name: str = "",
    watched: tuple[str, ...] = (),
) -> Node:
    """`ray start` for one node, not waiting for it to come up (wait_until_started)."""
    name = name or folder
    root = cluster_root / folder
    (root / "tmp").mkdir(parents=True)
    worker_ports = free_port_range(PORTS_PER_NODE)
    args = [
        RAY, "start", "--block", "--disable-usage-stats",
        f"--temp-dir={root / 'ray'}",
        f"--num-cpus={cpus}",
        "--num-gpus=0",
        f"--object-store-memory={100 * 1024 * 1024}",
        f"--resources={json.dumps({name: 1})}",
        f"--min-worker-port={worker_ports.start}",
        f"--max-worker-port={worker_ports.stop - 1}",
        # Fixed agent ports: with Ray's dynamic ones the raylet waits (about 15 s) for the agent to write
        # them to a file, and aborts when a loaded machine starts the agent more slowly than that.
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]  # fmt: skip
    if head_address is None:
        args += [
            "--head",
            f"--port={free_port()}",
            "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}",
        ]
    else:
        args += [f"--address={head_address}"]
    env = {
        **session_env(),
        **auth_env,
        **NODE_SETTINGS,
        **(HEAD_SETTINGS if head_address is None else {}),
        **audit_env(cluster_root, root, watched),
        "RAY_TMPDIR": str(root),
        "TMPDIR": str(root / "tmp"),
        "RAYGPT_DATA_CACHE": str(root / "data-cache"),
    }
    env.pop("RAY_ADDRESS", None)
    with open(root / "ray-start.log", "w") as log:
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return Node(name, root, process)


def session_env() -> dict[str, str]:
    """This process's environment, less what the session's `ray_local` cluster sets for itself (its
    preemption watcher off): a launcher on this cluster decides that itself, as on a real one."""
    return {name: value for name, value in os.environ.items() if name != "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"}


def audit_env(cluster_root: Path, machine_root: Path, watched: tuple[str, ...]) -> dict[str, str]:
    """What makes a process log its file events into its machine's audit log (none without `watched`)."""
    if not watched:
        return {}
    hook_dir = cluster_root / "file-audit"
    if not hook_dir.is_dir():
        hook_dir.mkdir()
        (hook_dir / "sitecustomize.py").write_text(FILE_AUDIT)
    path = os.pathsep.join(p for p in (str(hook_dir), os.environ.get("PYTHONPATH")) if p)
    watch = os.pathsep.join(watched)
    return {
        "PYTHONPATH": path,
        "RAYGPT_FILE_AUDIT_LOG": str(machine_root / AUDIT_LOG),
        "RAYGPT_FILE_AUDIT_WATCH": watch,
    }


def wait_until_started(node: Node) -> None:
    """`ray start --block` says it blocks once its node is up (and, on a worker node, registered)."""
    deadline = time.time() + START_TIMEOUT_S
    while "will now block forever" not in node.log.read_text(errors="replace"):
        if not node.alive() or time.time() > deadline:
            node.kill()
            raise RuntimeError(f"Ray node {node.name} did not start:\n{node.log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def read_head_address(head: Node) -> str:
    """The GCS address the head wrote to its root (RAY_TMPDIR/ray_current_cluster, via --temp-dir)."""
    return (head.root / "ray" / "ray_current_cluster").read_text().strip()


def start_cluster(cpus_per_node: dict[str, int], watch: list[Path] = ()) -> LoopbackCluster:
    """Nodes named as in `cpus_per_node`, the first one the head. Stop it with .stop(). File events in
    the `watch` folders and in the nodes' data caches are logged (cross_node_reads)."""
    cluster_root = Path(tempfile.mkdtemp(prefix="rgmn-", dir="/tmp"))  # short: Ray's socket paths sit below it
    auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    watched = tuple(str(folder) for folder in watch) + ((str(cluster_root),) if watch else ())
    names = list(cpus_per_node)
    nodes: dict[str, Node] = {}
    try:
        nodes[names[0]] = start_node(cluster_root, names[0], cpus_per_node[names[0]], auth_env, watched=watched)
        address = read_head_address(nodes[names[0]])
        # The other nodes start together: most of a node's start is waiting (its agents, registration).
        for name in names[1:]:
            nodes[name] = launch_node(cluster_root, name, cpus_per_node[name], auth_env, address, watched=watched)
        for name in names[1:]:
            wait_until_started(nodes[name])
    except BaseException:
        LoopbackCluster(cluster_root, "", nodes, auth_env).stop()
        raise
    return LoopbackCluster(cluster_root, address, nodes, auth_env, watched)
