"""What a default run prints, through Ray: rank 0's lines as nanoGPT's, no Ray prefixes or colour codes."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_default_run_reads_like_nanogpt(ray_local, tmp_path, char_data):
    argv = [
        "--dataset=shakespeare_char",
        f"--data_dir={char_data}",
        f"--out_dir={tmp_path / 'out'}",
        f"--storage_path={tmp_path / 'ray'}",
        "--n_layer=1",
        "--n_head=2",
        "--n_embd=16",
        "--block_size=16",
        "--batch_size=4",
        "--gradient_accumulation_steps=1",
        "--max_iters=4",
        "--eval_interval=2",
        "--eval_iters=2",
        "--log_interval=2",
        "--device=cpu",
        "--compile=False",
        "--warmup_iters=1",
        "--lr_decay_iters=10",
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
