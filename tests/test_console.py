"""What a default run prints, through Ray: rank 0's lines as nanoGPT's, no Ray prefixes or colour codes."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import TINY_LOCAL_RUN

from raygpt.driver.plan import RunPlan

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
    # where the time to the first step went, once
    startup = [line for line in lines if line.startswith("start-up ")]
    assert len(startup) == 1 and "worker group" in startup[0] and "first eval and step" in startup[0], startup


def test_the_start_up_line_counts_a_restarted_worker_group_from_its_restart():
    from raygpt.worker.startup import startup_line

    plan = RunPlan(1, False, 1.0, "run", launched_at=100.0, ray_ready_at=112.0)
    assert startup_line(plan, 120.0, 125.0, 160.0) == (
        "start-up 60.0s: launcher checks and Ray 12.0s, worker group 8.0s, model and data 5.0s, "
        "first eval and step (compile) 35.0s"
    )
    restarted = startup_line(plan, 5000.0, 5004.0, 5010.0)
    assert restarted == "start-up after a restart: model and data 4.0s, first eval and step (compile) 6.0s"
    on_gpu = startup_line(plan, 5000.0, 5004.0, 5010.0, peak_gib=61.234)
    assert on_gpu == f"{restarted}; peak memory 61.23 GiB"
    # Ray's key-value store knows better than the clock: an early restart, a late first start.
    early_restart = startup_line(plan, 130.0, 135.0, 140.0, first_group=False)
    assert early_restart == "start-up after a restart: model and data 5.0s, first eval and step (compile) 5.0s"
    assert startup_line(plan, 5000.0, 5004.0, 5010.0, first_group=True).startswith("start-up 4910.0s: ")
    # A Tune trial training in its own process: no launcher, Ray or worker group of its own to count.
    trial = RunPlan(1, False, 1.0, "run-trial", launched_at=300.0, ray_ready_at=300.0)
    assert startup_line(trial, 300.0, 301.5, 302.0) == (
        "start-up 2.0s: model and data 1.5s, first eval and step (compile) 0.5s"
    )
    # A restarted worker's own process start, and the parts of "model and data", where known.
    detailed = startup_line(plan, 5000.0, 5004.0, 5010.0, parts="checkpoint read 2.5s", process_started=4993.5)
    assert detailed == (
        "start-up after a restart: worker process to the loop 6.5s, model and data 4.0s, "
        "first eval and step (compile) 6.0s; model and data: checkpoint read 2.5s"
    )
    # From the failure Ray Train saw: the whole restart, and the wait for the new worker process.
    timed = startup_line(plan, 5000.0, 5004.0, 5010.0, process_started=4993.5, failed_at=4991.0)
    assert timed == (
        "start-up after a restart 19.0s: failure seen to the new worker process 2.5s, worker process to the "
        "loop 6.5s, model and data 4.0s, first eval and step (compile) 6.0s"
    )
    # A failure seen after the process started belongs to another restart: left out.
    assert startup_line(plan, 5000.0, 5004.0, 5010.0, process_started=4993.5, failed_at=4995.0) == (
        "start-up after a restart: worker process to the loop 6.5s, model and data 4.0s, "
        "first eval and step (compile) 6.0s"
    )


def test_laps_name_the_parts_of_set_up_that_took_time(monkeypatch):
    from raygpt.worker import startup

    clock = iter([101.0, 101.01, 104.5])
    monkeypatch.setattr(startup.time, "time", lambda: next(clock))
    laps = startup.Laps(100.0)
    for name in ("device", "data", "checkpoint read"):
        laps(name)
    assert laps.summary() == "device 1.0s, checkpoint read 3.5s"  # data's 0.01 s is left out


@pytest.mark.ray
def test_only_the_first_worker_group_of_a_launch_is_its_first(ray_local):
    from raygpt.worker.startup import first_worker_group

    launch_id = uuid.uuid4().hex
    assert first_worker_group(launch_id) is True
    assert first_worker_group(launch_id) is False  # the group Ray starts again after a failure
    assert first_worker_group(uuid.uuid4().hex) is True  # another launch (a rerun, a Tune trial)
    assert first_worker_group("") is None  # local mode: no launch to ask about
