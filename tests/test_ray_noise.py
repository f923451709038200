"""Ray's own noise stays off the nanoGPT-like console (issue 34), with another Ray running on the machine.

Two causes, each fixed through Ray's settings: Train's placement group cleaner asks Ray's state API about the
controller without an address, which made Ray search the machine for Ray instances and refuse (a traceback)
or warn each second; and Ray Core logged an error line in the controller for Train's restartable preemption
watcher, now started without restarts (test_preemption's drain test: it still stops the run on notice). The
other Ray here is the session's `ray_local`, in this process.
"""

import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import TINY_LOCAL_RUN
from multinode import RAY, Node, free_port, free_port_range, session_env, wait_until_started

import raygpt

pytestmark = pytest.mark.ray
CODE = str(Path(raygpt.__file__).resolve().parents[1])  # the raygpt under test, for the launcher and the head

# What Ray printed before: the cleaner's traceback (or Ray's warning, joined) and Ray Core's error line.
RAY_NOISE = ("PlacementGroupCleaner", "multiple active Ray instances", "PreemptionWatcher", "Traceback")
RAY_RUN = [*(arg for arg in TINY_LOCAL_RUN if not arg.startswith("--local_mode")), "--num_workers=1",
           "--cpus_per_worker=1"]  # fmt: skip


def launch(argv: list[str], env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "raygpt.launch", *argv], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "best val loss" in out, out
    return out


def assert_quiet(out: str) -> None:
    noise = [line for line in out.splitlines() if any(word in line for word in RAY_NOISE)]
    assert not noise, out


@pytest.fixture
def short_tmp():
    """A short folder: Ray's socket paths sit below a Ray temp dir."""
    folder = Path(tempfile.mkdtemp(prefix="rgn-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_ray_started_here_beside_another_one_prints_only_the_run(ray_local, char_data, tmp_path, short_tmp):
    # Its own RAY_TMPDIR holds no address file: the launcher starts a Ray of its own, the second on this machine.
    env = {**session_env(), "PYTHONPATH": CODE, "HOME": str(tmp_path), "RAY_TMPDIR": str(short_tmp)}
    env.pop("RAY_ADDRESS", None)
    argv = [*RAY_RUN, f"--data_dir={char_data}", f"--out_dir={tmp_path / 'out'}", f"--storage_path={tmp_path / 'r'}"]
    out = launch(argv, env, tmp_path)
    assert "raygpt: started a Ray instance here" in out, out
    assert_quiet(out)


@pytest.fixture
def head_with_dashboard(short_tmp):
    """A `ray start --head` as a user starts one (its dashboard on: Ray's state API goes through it), with its
    own ports, temp dir and token. Its workers find its address file (RAY_TMPDIR), as on a machine with one
    `ray start`: with another Ray running, Ray warned at each lookup that it chose this one."""
    root, auth = short_tmp, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    (root / "tmp").mkdir()
    workers = free_port_range(100)
    ports = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port", "node-manager-port",
             "object-manager-port")  # fmt: skip
    args = [RAY, "start", "--head", "--block", "--disable-usage-stats", f"--temp-dir={root / 'ray'}",
            "--num-cpus=2", "--num-gpus=0", f"--object-store-memory={100 * 1024 * 1024}",
            f"--min-worker-port={workers.start}", f"--max-worker-port={workers.stop - 1}",
            *(f"--{name}={free_port()}" for name in ports)]  # fmt: skip
    env = {**session_env(), **auth, "PYTHONPATH": CODE, "RAY_TMPDIR": str(root), "TMPDIR": str(root / "tmp")}
    env.pop("RAY_ADDRESS", None)
    with open(root / "ray-start.log", "w") as log:
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = Node("head", root, process)
    try:
        wait_until_started(head)
        yield (root / "ray" / "ray_current_cluster").read_text().strip(), auth
    finally:
        head.kill()


def test_a_run_on_a_joined_cluster_beside_another_ray_prints_only_the_run(ray_local, head_with_dashboard,
                                                                          char_data, tmp_path):  # fmt: skip
    address, auth = head_with_dashboard
    env = {**session_env(), **auth, "PYTHONPATH": CODE, "HOME": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    argv = [*RAY_RUN, f"--address={address}", f"--data_dir={char_data}", f"--out_dir={tmp_path / 'out'}",
            f"--storage_path={tmp_path / 'r'}"]  # fmt: skip
    out = launch(argv, env, tmp_path)
    assert f"raygpt: joined the Ray cluster at {address}" in out, out
    assert_quiet(out)
