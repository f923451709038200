"""`ray job submit` against a real Ray head on loopback: a tiny CPU training job runs to SUCCEEDED, and its
files outlive the job (test_job_outdir.py has the fast tier of where they land).

The test starts its own head (`ray start --head`, own ports and temp dir), submits with the `ray` CLI, and
stops only the processes of the cluster it started.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import TINY_LOCAL_RUN

pytestmark = pytest.mark.ray  # it starts its own Ray head with `ray start`

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_up(port: int) -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
        return True
    except urllib.error.HTTPError:
        return True  # it answers (401 without a token): it is up
    except OSError:
        return False


@pytest.fixture
def ray_head():
    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray_cli is None:
        pytest.skip("the ray CLI is not installed")
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rgh")  # short: Ray's unix socket paths have a length limit
    gcs, dashboard, client, agent = (free_port() for _ in range(4))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    head = subprocess.Popen(
        [
            ray_cli,
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            "--min-worker-port=31000",
            "--max-worker-port=31999",
            f"--temp-dir={temp_dir}",
            "--num-cpus=2",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while not dashboard_up(dashboard):
            if time.time() > deadline or head.poll() is not None:
                pytest.fail("the Ray head did not come up")
            time.sleep(0.2)
        yield ray_cli, f"http://127.0.0.1:{dashboard}"
    finally:
        # Stop only this cluster: every process started for it names its temp dir.
        subprocess.run(["pkill", "-9", "-f", temp_dir], check=False)
        head.send_signal(signal.SIGKILL)
        head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_submitted_job_trains_keeps_its_checkpoint_and_a_resubmit_finds_it(ray_head, tmp_path, char_data):
    """`ray job submit --working-dir` with the default (relative) out_dir, and a WandB key handed to the
    workers as the README does: the job succeeds; ckpt.pt is kept in storage_path's run folder (Ray deletes
    its copy of the project when the job ends); the key shows in no output or file; and the same job
    submitted again finds the finished run there."""
    ray_cli, address = ray_head
    storage = tmp_path / "ray"
    secret = "wandb-key-" + os.urandom(8).hex()
    runtime_env = json.dumps({"env_vars": {"WANDB_API_KEY": secret, "WANDB_MODE": "offline"}})
    run = [arg for arg in TINY_LOCAL_RUN if not arg.startswith("--local_mode")]
    submit = [ray_cli, "job", "submit", "--address", address, "--working-dir", str(REPO), "--runtime-env-json",
              runtime_env, "--", sys.executable, "-m", "raygpt.launch", *run, "--num-workers", "1",
              f"--data_dir={char_data}", f"--storage_path={storage}", "--wandb_log=True"]  # fmt: skip
    # `ray start --head` turns token authentication on; the CLI reads ~/.ray/auth_token in token mode.
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "token"}
    first = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
    output = first.stdout + first.stderr
    assert first.returncode == 0 and "succeeded" in output and "best val loss" in output, output[-3000:]
    kept = storage / "out" / "out"
    assert f"raygpt: out_dir out is {kept}" in output, output[-3000:]
    assert (kept / "ckpt.pt").is_file() and (kept / "metrics.jsonl").is_file()
    assert list((storage / "out").glob("checkpoint_*/ckpt.pt"))
    assert list((kept / "wandb").glob("offline-run-*"))  # wandb ran, with the key in its env
    assert secret not in output
    for path in tmp_path.rglob("*"):  # checkpoints, configs, Ray's results, wandb's files
        assert not path.is_file() or secret.encode() not in path.read_bytes(), path
    again = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
    output = again.stdout + again.stderr
    assert again.returncode == 0 and "succeeded" in output, output[-3000:]
    assert "is already at iter 4 (max_iters 4): nothing to do" in output, output[-3000:]
