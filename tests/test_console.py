"""What a default run prints, through Ray: rank 0's lines as nanoGPT's, no Ray prefixes or colour codes."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import TINY_LOCAL_RUN

REPO = Path(__file__).resolve().parents[1]


def test_a_default_run_reads_like_nanogpt(ray_local, tmp_path, char_data):
    argv = [
        *(arg for arg in TINY_LOCAL_RUN if arg != "--local_mode=True"),
        f"--data_dir={char_data}",
        f"--out_dir={tmp_path / 'out'}",
        f"--storage_path={tmp_path / 'ray'}",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_local, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "raygpt.launch", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith(f"raygpt: joined the Ray cluster at {ray_local}\n"), out
    assert "\x1b[" not in out + done.stderr  # no colour codes in a file
    assert "pid=" not in out  # no "(RayTrainWorker pid=...)" prefixes
    assert "Requesting resources" not in out + done.stderr  # the controller's INFO lines stay in Ray's logs
    lines = out.splitlines()
    assert any(line.startswith("step 2: train loss ") for line in lines)
    assert any(line.startswith("iter 3: loss ") and ", eta " in line for line in lines)
