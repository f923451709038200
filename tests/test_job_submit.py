"""`ray job submit` against a real Ray head on loopback: a tiny CPU training job runs to SUCCEEDED.

The test starts its own head (`ray start --head`, own ports and temp dir), submits with the job SDK
(what `ray job submit` uses), and stops only the processes of the cluster it started.
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


def test_job_submit_trains_and_checkpoints(ray_head, tmp_path, char_data):
    ray_cli, address = ray_head
    storage = tmp_path / "ray"
    # The README's way to hand workers a WandB key; it must never show up in output or saved files.
    secret = "wandb-key-" + os.urandom(8).hex()
    runtime_env = json.dumps({"env_vars": {"WANDB_API_KEY": secret, "WANDB_MODE": "offline"}})
    # `ray start --head` turns token authentication on; the CLI reads ~/.ray/auth_token in token mode.
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "token"}
    submit = subprocess.run(
        [
            ray_cli,
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            runtime_env,
            "--",
            sys.executable,
            "-m",
            "raygpt.launch",
            "--dataset=shakespeare_char",
            f"--data_dir={char_data}",
            f"--out_dir={tmp_path / 'out-job'}",
            f"--storage_path={storage}",
            "--num-workers",
            "1",
            "--n_layer=1",
            "--n_head=2",
            "--n_embd=16",
            "--block_size=16",
            "--batch_size=4",
            "--gradient_accumulation_steps=1",
            "--max_iters=4",
            "--eval_interval=2",
            "--eval_iters=2",
            "--device=cpu",
            "--compile=False",
            "--warmup_iters=1",
            "--lr_decay_iters=10",
            "--wandb_log=True",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = submit.stdout + submit.stderr
    assert submit.returncode == 0, output[-3000:]
    assert "succeeded" in output and "best val loss" in output, output[-3000:]
    assert list((storage / "out-job").glob("checkpoint_*/ckpt.pt"))
    assert list((tmp_path / "out-job" / "wandb").glob("offline-run-*"))  # wandb ran, with the key in its env
    assert secret not in output
    for path in tmp_path.rglob("*"):  # checkpoints, configs, Ray's results, wandb's files
        assert not path.is_file() or secret.encode() not in path.read_bytes(), path
