"""`ray up cluster-onprem.yaml` for real: Ray's cluster launcher sets up a head and a worker over SSH, a
job trains through `ray job submit`, its rerun continues it, and `ray down` ends the cluster.

The two machines are loopback addresses of this one: the test runs its own sshd (config, host key, pid file
and authorized key in its own folder; never the system's sshd or ~/.ssh) on 127.0.0.23 (the head) and
127.0.0.24 (the worker), and each address logs in to a home folder of its own (sshd's SetEnv HOME), so the
nodes share the disk but not their ~/.bashrc, ~/raygpt, ~/.ray or TMPDIR. The test's copy of
cluster-onprem.yaml keeps the shipped file's commands, less its `pip install` lines, and changes only what
two nodes on one offline machine need: each node starts Ray with its own ports, --temp-dir and node IP,
and the head with no CPUs, so the training worker can only run on the worker node. What each node's
account holds beforehand (make_home): this venv where the setup makes one, and a ~/.bashrc whose `ray
stop` (the start commands run it, and `ray down` runs it on the head) stops only that node's processes,
by pid (tests/stop_ray_node.py): the real one would stop every Ray on this machine.
"""

import getpass
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from multinode import free_port, free_port_range
from stop_ray_node import node_processes

pytestmark = pytest.mark.ray  # `ray up` starts a Ray cluster

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "cluster-onprem.yaml"
RAY = str(Path(sys.executable).with_name("ray"))
SSHD = "/usr/sbin/sshd"
STOP_NODE = REPO / "tests" / "stop_ray_node.py"
HEAD_IP, WORKER_IP = "127.0.0.23", "127.0.0.24"
NODES = {HEAD_IP: "head", WORKER_IP: "worker"}  # each address's home folder, below the test's root
JOB_TIMEOUT_S = 240

TINY_JOB = [
    "--dataset=shakespeare_char",
    "--n_layer=1",
    "--n_head=2",
    "--n_embd=16",
    "--block_size=16",
    "--batch_size=4",
    "--gradient_accumulation_steps=1",
    "--eval_interval=2",
    "--eval_iters=2",
    "--log_interval=2",
    "--device=cpu",
    "--compile=False",
    "--warmup_iters=1",
    "--lr_decay_iters=10",
]


def missing_tools() -> str | None:
    """Why this machine cannot run the test, or None."""
    if os.geteuid() != 0:
        return "its sshd listens on port 22 of loopback addresses: needs root"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} is absent: apt-get install openssh-server (.ci/run does)"
    for tool in ("ssh", "ssh-keygen", "rsync"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: apt-get install openssh-server rsync (.ci/run does)"
    return None


def wait_for_port(host: str, port: int, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.time() > deadline:
                pytest.fail(f"{what} is not listening on {host}:{port}")
            time.sleep(0.2)


def start_sshd(root: Path) -> subprocess.Popen:
    """An sshd of the test's own, in the foreground (its pid is ours to end), letting in the test's key."""
    folder = root / "sshd"
    folder.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", folder / "host_key"], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", root / "key"], check=True)
    shutil.copyfile(root / "key.pub", folder / "authorized_keys")
    homes = "".join(f"Match LocalAddress {ip}\n  SetEnv HOME={root / name}\n" for ip, name in NODES.items())
    (folder / "sshd_config").write_text(
        f"ListenAddress {HEAD_IP}:22\nListenAddress {WORKER_IP}:22\n"
        f"HostKey {folder / 'host_key'}\nPidFile {folder / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\n" + homes
    )
    for ip in NODES:
        with socket.socket() as probe:
            if probe.connect_ex((ip, 22)) == 0:
                pytest.fail(f"something else listens on {ip}:22 already")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder (systemd makes it at boot)
    sshd = subprocess.Popen(
        [SSHD, "-D", "-f", folder / "sshd_config", "-E", folder / "sshd.log"], start_new_session=True
    )
    for ip in NODES:
        wait_for_port(ip, 22, 30, "the test's sshd")
    assert sshd.poll() is None, (folder / "sshd.log").read_text()
    return sshd


# What each node's account has before `ray up` (Ray sources ~/.bashrc before each command): its own TMPDIR
# (another machine's /tmp); the project copy that file_mounts makes importable, in place of `pip install
# -e`; ~/bin first on PATH, for the `ssh` below; and a `ray` function whose `stop` stops only this node's
# Ray (tests/stop_ray_node.py): a function wins over the venv's `ray`, wherever the setup puts it on PATH.
BASHRC = """\
export TMPDIR="$HOME/tmp" PYTHONPATH="$HOME/raygpt" PATH="$HOME/bin:$PATH"
ray() {{ if [ "$1" = stop ]; then shift; {python} {stop} "$HOME" "$@"; else command ray "$@"; fi; }}
"""
# OpenSSH reads ~ in `-i ~/...` as the home in /etc/passwd, not HOME; the head's autoscaler passes it
# -i ~/ray_bootstrap_key.pem, which ray up copied to this node's home.
SSH_IN_THIS_HOME = """\
#!/bin/sh
for a; do shift; case "$i$a" in "-i~/"*) a="$HOME/${{a#??}}";; esac; set -- "$@" "$a"; i=$a; done
exec {ssh} "$@"
"""


def make_home(root: Path, name: str) -> Path:
    """A node's home: BASHRC, ~/bin/ssh, and this venv linked where the cluster file makes one."""
    home = root / name
    (home / "bin").mkdir(parents=True)
    (home / "tmp").mkdir()
    (home / ".bashrc").write_text(BASHRC.format(python=sys.executable, stop=STOP_NODE))
    (home / "bin" / "ssh").write_text(SSH_IN_THIS_HOME.format(ssh=shutil.which("ssh")))
    (home / "bin" / "ssh").chmod(0o755)
    (home / "raygpt-venv").symlink_to(sys.prefix)
    return home


def with_flags(command: str, flags: dict) -> str:
    """A `ray start` line with these --flags in place of its own."""
    kept = [word for word in command.split() if word.split("=")[0].lstrip("-") not in flags]
    return " ".join(kept + [f"--{name}={value}" for name, value in flags.items()])


def node_flags(root: Path, name: str, ip: str) -> dict:
    """Ports, temp dir and IP of a second Ray node on this machine; Ray's defaults would collide."""
    workers = free_port_range(50)
    flags = {"node-ip-address": ip, "temp-dir": root / name / "ray"}
    for port in ("node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc"):
        flags[f"{port}-port"] = free_port()
    for port in ("runtime-env-agent", "metrics-export"):
        flags[f"{port}-port"] = free_port()
    flags.update({"min-worker-port": workers.start, "max-worker-port": workers.stop - 1})
    return flags


def cluster_name(root: Path) -> str:
    return f"raygpt-test-{root.name}"


def remove_ssh_control_folder(cluster: str) -> None:
    """The folder for SSH's control sockets that Ray's launcher makes in /tmp for each user and cluster
    (ray/autoscaler/_private/command_runner.py names it so); empty once the connections are gone."""
    user, name = (hashlib.sha256(text.encode()).hexdigest()[:10] for text in (getpass.getuser(), cluster))
    for folder in (f"/tmp/ray_ssh_{user}/{name}", f"/tmp/ray_ssh_{user}"):
        try:
            os.rmdir(folder)  # only if empty: another cluster's sockets may be in the parent
        except OSError:
            pass


def cluster_file(root: Path, gcs: int, dashboard: int) -> Path:
    """The test's copy of cluster-onprem.yaml (module docstring: what it changes)."""
    config = yaml.safe_load(SHIPPED.read_text())
    config["cluster_name"] = cluster_name(root)
    config["provider"].update(head_ip=HEAD_IP, worker_ips=[WORKER_IP])
    config["auth"].update(ssh_user=getpass.getuser(), ssh_private_key=str(root / "key"))
    config["setup_commands"] = [c for c in config["setup_commands"] if "pip install" not in c]
    head = node_flags(root, "head", HEAD_IP) | {
        "port": gcs,
        "dashboard-port": dashboard,
        "ray-client-server-port": free_port(),
        "num-cpus": 0,
    }
    worker = node_flags(root, "worker", WORKER_IP) | {"address": f"$RAY_HEAD_IP:{gcs}", "num-cpus": 2}
    for key, flags in (("head_start_ray_commands", head), ("worker_start_ray_commands", worker)):
        config[key] = [with_flags(c, flags) if "ray start" in c else c for c in config[key]]
    # The head's autoscaler serves metrics on a fixed port (Ray's AUTOSCALER_METRIC_PORT) by default.
    config["head_start_ray_commands"] = [
        f"AUTOSCALER_METRIC_PORT={free_port()} {c}" if "ray start" in c else c
        for c in config["head_start_ray_commands"]
    ]
    path = root / "cluster.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def launcher_env(root: Path) -> dict:
    """The environment of the `ray` commands run from 'your machine': its own home (the token
    `ray get-auth-token --generate` makes) and temp folder (the local provider's cluster state)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return env | {"HOME": str(root / "local"), "TMPDIR": str(root / "local" / "tmp"), "RAY_AUTH_MODE": "token"}


def ray(env: dict, *args, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run([RAY, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        pytest.fail(f"ray {' '.join(map(str, args))} took over {timeout} s:\n{output[-4000:]}")
    if check:
        assert done.returncode == 0, f"ray {' '.join(map(str, args))}:\n{(done.stdout + done.stderr)[-4000:]}"
    return done


def submit(env: dict, address: str, args: list[str], root: Path) -> str:
    """`ray job submit` of the launcher; polled while the head's job agent is not up yet."""
    deadline = time.time() + JOB_TIMEOUT_S
    while True:
        done = ray(env, "job", "submit", "--address", address, "--working-dir", ".", "--",
                   "python", "-m", "raygpt.launch", *args, timeout=JOB_TIMEOUT_S, check=False)  # fmt: skip
        output = done.stdout + done.stderr
        if "No available agent" not in output or time.time() > deadline:
            assert done.returncode == 0 and "succeeded" in output, output[-4000:] + head_autoscaler_log(root)
            return output
        time.sleep(1)


def head_autoscaler_log(root: Path) -> str:
    """The end of what the head's autoscaler printed while setting up the worker (why it did not join)."""
    log = root / "head" / "ray" / "session_latest" / "logs" / "monitor.out"
    return "\nhead's monitor.out:\n" + log.read_text(errors="replace")[-3000:] if log.is_file() else ""


def state_api(address: str, token: str, resource: str) -> list[dict]:
    """What `ray list RESOURCE --detail` reads from the dashboard (Ray's state API), finished actors too."""
    request = urllib.request.Request(
        f"{address}/api/v0/{resource}?detail=1&limit=10000", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)["data"]["result"]["result"]


def training_nodes(address: str, token: str) -> set[str]:
    """The IPs of the nodes where Ray Train's workers ran."""
    ip_of = {node["node_id"]: node["node_ip"] for node in state_api(address, token, "nodes")}
    return {ip_of[actor["node_id"]] for actor in state_api(address, token, "actors")
            if actor["class_name"] == "RayTrainWorker"}  # fmt: skip


def end_process_tree(process: subprocess.Popen) -> None:
    """A process started in a session of its own, and everything below it (`ray dashboard`'s ssh, sshd's
    sessions and the SSH control masters they serve)."""
    below = psutil.Process(process.pid).children(recursive=True) if process.poll() is None else []
    for each in [process, *below]:
        try:
            each.kill()
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    process.wait(timeout=30)
    psutil.wait_procs(below, timeout=30)


@pytest.fixture
def loopback_machines():
    reason = missing_tools()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="rgup-", dir="/tmp"))  # short: Ray's socket paths sit below it
    sshd = None
    try:
        for name in NODES.values():
            make_home(root, name)
        (root / "local" / "tmp").mkdir(parents=True)
        sshd = start_sshd(root)
        yield root
    finally:
        for name in NODES.values():  # whatever `ray down` left: the worker's Ray only loses its head
            subprocess.run([sys.executable, STOP_NODE, root / name, "--force"], check=False)
        if sshd is not None:
            end_process_tree(sshd)
        remove_ssh_control_folder(cluster_name(root))
        shutil.rmtree(root, ignore_errors=True)


def test_ray_up_runs_a_job_on_the_worker_node_and_ray_down_ends_it(loopback_machines, char_data):
    root = loopback_machines
    gcs, dashboard, forwarded = free_port(), free_port(), free_port()
    config = cluster_file(root, gcs, dashboard)
    env = launcher_env(root)
    token = ray(env, "get-auth-token", "--generate").stdout.strip()
    ray(env, "up", "-y", "--no-config-cache", config, timeout=300)
    tunnel = subprocess.Popen([RAY, "dashboard", config, "--port", str(forwarded), "--remote-port", str(dashboard)],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
    try:
        address = f"http://127.0.0.1:{forwarded}"
        wait_for_port("127.0.0.1", forwarded, 60, "`ray dashboard`'s forwarded port")
        storage, out_dir = root / "storage", root / "out-rayup"
        run = [*TINY_JOB, f"--data_dir={char_data}", f"--storage_path={storage}", f"--out_dir={out_dir}",
               "--num-workers", "1", "--wait-for-resources"]  # fmt: skip
        output = submit(env, address, [*run, "--max_iters=4"], root)
        assert "best val loss" in output, output[-4000:]
        assert training_nodes(address, token) == {WORKER_IP}  # the head has no CPUs
        assert list((storage / out_dir.name).glob("checkpoint_*/ckpt.pt")), output[-4000:]
        output = submit(env, address, [*run, "--max_iters=6"], root)
        assert f"continuing run '{out_dir.name}'" in output and "from iter 4" in output, output[-4000:]
    finally:
        end_process_tree(tunnel)
    down = ray(env, "down", "-y", config, timeout=120)
    assert "stopped" in down.stdout, down.stdout[-4000:]  # our `ray stop` ran on the head
    assert not node_processes(str(root / "head"))
