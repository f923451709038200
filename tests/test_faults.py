"""Kill things for real and check nothing is lost: a Ray worker (SIGKILL), the driver (SIGINT, SIGKILL).

Each faulted run is the `python -m raygpt.launch` CLI in a subprocess joined to the session's Ray
cluster; its final weights must be bit-identical to those of an uninterrupted run of the same config.
"""

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from raygpt import launch
from raygpt.config.schema import TrainConfig
from raygpt.core import checkpoint

pytestmark = pytest.mark.ray  # the launcher joins a Ray cluster as a subprocess

FAULT_RUN = dict(
    dataset="shakespeare_char",
    n_layer=2,
    n_head=2,
    n_embd=32,
    block_size=32,
    batch_size=8,
    gradient_accumulation_steps=2,
    learning_rate=1e-2,
    min_lr=1e-3,
    warmup_iters=5,
    lr_decay_iters=400,
    max_iters=400,  # long enough after the first checkpoint that a stop lands before the end
    eval_interval=50,
    eval_iters=4,
    log_interval=1,
    device="cpu",
    dtype="float32",
    compile=False,
    seed=11,
    num_workers=2,
    cpus_per_worker=1,
)


def ray_actor_processes(actor: str, started_after: float) -> list[psutil.Process]:
    """The processes of Ray actor class `actor` (Ray titles them ray::<class>...) started after a time (the
    shared cluster may still hold an earlier run's) below this process (the test's clusters are; another
    Ray on the machine is not)."""
    return [
        p
        for p in psutil.process_iter(["pid", "cmdline", "create_time"])
        if any(actor in part for part in p.info["cmdline"] or ())
        and p.info["create_time"] > started_after
        and below_this_process(p)
    ]


def below_this_process(process: psutil.Process) -> bool:
    try:
        return any(parent.pid == os.getpid() for parent in process.parents())
    except psutil.Error:
        return False


def train_worker_pids(started_after: float) -> list[int]:
    """The Ray Train worker processes of the run started after a time."""
    pids = [p.pid for p in ray_actor_processes("RayTrainWorker", started_after)]
    assert pids, "no Ray Train worker of this run is running"
    return pids


def wait_until_reaped(started_after: float, timeout: float = 60) -> None:
    """Until a dead driver's run is gone: Ray ends its controller and workers once it sees the driver go,
    and a rerun starting before that would wait for their CPUs or race their last writes."""
    run = [p for actor in ("TrainController", "RayTrainWorker") for p in ray_actor_processes(actor, started_after)]
    _, alive = psutil.wait_procs(run, timeout=timeout)
    assert not alive, f"Ray did not end the dead driver's run: {alive}"


def cli_args(values: dict) -> list[str]:
    return [f"--{key}={value}" for key, value in values.items()]


def reference_weights(tmp_path, char_data, **overrides) -> dict:
    cfg = TrainConfig(
        **{**FAULT_RUN, **overrides},
        data_dir=str(char_data),
        out_dir=str(tmp_path / "out-reference"),
        storage_path=str(tmp_path / "ray"),
    )
    launch.run(cfg)
    return checkpoint.load(tmp_path / "out-reference" / "ckpt.pt")


def start_cli(tmp_path, char_data, address, name, **extra):
    values = {
        **FAULT_RUN,
        "data_dir": char_data,
        "out_dir": tmp_path / f"out-{name}",
        "storage_path": tmp_path / "ray",
        **extra,
    }
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "raygpt.launch", *cli_args(values)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for(process, pattern: str, timeout: float = 180) -> re.Match:
    """Read the process's output until a line matches `pattern`."""
    deadline = time.time() + timeout
    for line in process.stdout:
        if match := re.search(pattern, line):
            return match
        if time.time() > deadline:
            break
    process.kill()
    pytest.fail(f"never saw {pattern!r}")


def wait_until_registered(process, run_dir, timeout: float = 60) -> None:
    """A reported checkpoint counts for a restart only once Ray's controller has registered it (it polls
    the workers); wait until its snapshot in storage names one, reading the output meanwhile."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while not (snapshot.exists() and "checkpoint_" in snapshot.read_text()):
        if time.time() > deadline:
            process.kill()
            pytest.fail("Ray never registered the checkpoint")
        wait_for(process, r"iter \d+:")


def finish(process, timeout: float = 240) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def assert_bit_identical(state: dict, reference: dict, max_iters: int = FAULT_RUN["max_iters"]):
    assert state["iter_num"] == reference["iter_num"] == max_iters
    for key, tensor in reference["model"].items():
        assert torch.equal(state["model"][key], tensor), key
    assert state["best_val_loss"] == reference["best_val_loss"]


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory, char_data):
    return reference_weights(tmp_path_factory.mktemp("reference"), char_data)


def test_killed_worker_is_replaced_and_the_run_ends_bit_identical(ray_local, tmp_path, char_data, reference):
    started = time.time()
    process = start_cli(tmp_path, char_data, ray_local, "worker-kill", max_failures=1)
    wait_for(process, r"saved checkpoint")  # the checkpoint at iter 50 ...
    wait_until_registered(process, tmp_path / "ray" / "out-worker-kill")
    wait_for(process, r"iter \d+:")  # ... and before the next
    os.kill(train_worker_pids(started_after=started)[-1], signal.SIGKILL)
    returncode, output = finish(process)
    assert returncode == 0, output[-3000:]
    # The restarted group's start-up line counts from the failure Ray Train saw, and its parts add up.
    restart = re.search(r"^start-up after a restart ([\d.]+)s: failure seen to the new worker process ([\d.]+)s, "
                        r"worker process to the loop ([\d.]+)s, model and data ([\d.]+)s, "
                        r"first eval and step \(compile\) ([\d.]+)s", output, re.MULTILINE)  # fmt: skip
    assert restart, output[-3000:]
    total, *parts = (float(seconds) for seconds in restart.groups())
    assert abs(total - sum(parts)) <= 0.25 and parts[0] < 30, restart.group(0)
    state = checkpoint.load(tmp_path / "out-worker-kill" / "ckpt.pt")
    # The restarted group continued from a Ray checkpoint (the lineage each checkpoint records) ...
    assert "checkpoint_" in (state["resumed_from"] or ""), output[-3000:]
    # ... and ended exactly where the uninterrupted run did.
    assert_bit_identical(state, reference)


# A SIGKILLed driver and its rerun are tests/test_multinode.py's (with out_dir gone as well).
@pytest.mark.parametrize("sig", [signal.SIGINT], ids=["SIGINT"])
def test_killed_driver_then_same_command_continues_bit_identical(ray_local, tmp_path, char_data, reference, sig):
    name = f"driver-{sig.name}"
    # WandB (offline) rides along: the rerun must continue the same wandb run, not start a new one.
    tracked = dict(wandb_log=True, wandb_project="raygpt-test")
    started = time.time()
    process = start_cli(tmp_path, char_data, ray_local, name, **tracked)
    wait_for(process, r"saved checkpoint")
    wait_until_registered(process, tmp_path / "ray" / f"out-{name}")
    os.killpg(process.pid, sig)
    returncode, output = finish(process)
    if sig == signal.SIGINT:  # Ctrl-C: the run stops and its last line says how to go on
        last = output.strip().splitlines()[-1]
        assert returncode == 130 and last.startswith("interrupted: the latest checkpoint is "), output[-3000:]
        assert last.endswith("run the same command again to continue from it"), last
    # The run stopped part way: the rerun has a checkpoint before the last iteration to continue from.
    assert 0 < checkpoint.load(tmp_path / f"out-{name}" / "ckpt.pt")["iter_num"] < FAULT_RUN["max_iters"]
    wait_until_reaped(started)
    rerun = start_cli(tmp_path, char_data, ray_local, name, **tracked)
    returncode, output = finish(rerun)
    assert returncode == 0, output[-3000:]
    state = checkpoint.load(tmp_path / f"out-{name}" / "ckpt.pt")
    # The latest iteration saved: Ray's latest checkpoint, or out_dir's ckpt.pt where Ray had not
    # registered the last one when the driver stopped.
    assert state["resumed_from"], output[-3000:]
    assert_bit_identical(state, reference)
    # wandb names each offline session's folder offline-run-<time>-<run id>: two sessions, one run.
    sessions = sorted((tmp_path / f"out-{name}" / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2, sessions
    assert {folder.name.rsplit("-", 1)[1] for folder in sessions} == {state["wandb_run_id"]}
