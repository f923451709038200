"""Runs across nodes that share nothing but object storage, on a Ray cluster of loopback nodes.

Each node has its own root (Ray's temp files, TMPDIR, its dataset cache); the dataset is in S3 (moto on
loopback) and every node stages its own copy. Each run is the `python -m raygpt.launch` CLI in a
subprocess joined to the `ray_nodes` cluster, whose head trains nothing; what a test checks it reads from
Ray's storage (storage_path), never from out_dir, which on a real cluster is on rank 0's node only. All
nodes share one disk here, so every test also checks the cluster's file log: no machine (the driver's
is the head) read a file in out_dir or a data cache that another machine wrote.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.fs
import pytest
from conftest import TINY_RUN
from test_faults import FAULT_RUN, assert_bit_identical, cli_args, finish, wait_for, wait_until_reaped

from raygpt.core import checkpoint
from raygpt.prep.dataset import prepare_dataset
from raygpt.storage.datasets import cache_folder, dataset_uri
from raygpt.storage.uri import join_uri, list_folders

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]

TWO_WORKERS = dict(num_workers=2, cpus_per_worker=1)  # one CPU each: the nodes have one CPU each


def prepared_dataset(s3_server, shakespeare_path) -> str:
    """shakespeare_char prepared in a bucket of its own; returns its data_dir URI."""
    data_dir = f"{s3_server.create_bucket()}/data"
    prepare_dataset("shakespeare_char", data_dir, input_path=shakespeare_path)
    return data_dir


@pytest.fixture(scope="module")
def s3_data(s3_server, shakespeare_path) -> str:
    return prepared_dataset(s3_server, shakespeare_path)


def storage_for(kind: str, s3_server, tmp_path) -> str:
    return f"{s3_server.create_bucket()}/ray" if kind == "s3" else str(tmp_path / "ray")


def start_run(cluster, values: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "raygpt.launch", f"--address={cluster.address}", *cli_args(values)],
        env=cluster.driver_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def run_folder(storage: str, run_name: str) -> tuple[pyarrow.fs.FileSystem, str]:
    return pyarrow.fs.FileSystem.from_uri(f"{storage.rstrip('/')}/{run_name}")


def registered_checkpoints(storage: str, run_name: str) -> bool:
    """Whether Ray's controller has registered a checkpoint of the run (only those count for a restart)."""
    filesystem, folder = run_folder(storage, run_name)
    snapshot = f"{folder}/checkpoint_manager_snapshot.json"
    if filesystem.get_file_info(snapshot).type != pyarrow.fs.FileType.File:
        return False
    with filesystem.open_input_stream(snapshot) as f:
        return "checkpoint_" in f.read().decode()


def wait_until_registered(process, storage: str, run_name: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not registered_checkpoints(storage, run_name):
        if time.time() > deadline:
            process.kill()
            pytest.fail("Ray never registered the checkpoint")
        wait_for(process, r"iter \d+:")


def newest_state(storage: str, run_name: str, scratch) -> dict:
    """The checkpoint with the highest iter_num among those Ray keeps in storage, copied here to load."""
    filesystem, folder = run_folder(storage, run_name)
    found = filesystem.get_file_info(pyarrow.fs.FileSelector(folder))
    folders = [
        info.path
        for info in found
        if info.base_name.startswith("checkpoint_") and info.type == pyarrow.fs.FileType.Directory
    ]
    assert folders, f"no checkpoint in {storage}/{run_name}"
    states = []
    for i, path in enumerate(folders):
        # A node killed while uploading leaves a folder without its ckpt.pt: no checkpoint Ray reported.
        if filesystem.get_file_info(f"{path}/{checkpoint.CKPT_NAME}").type != pyarrow.fs.FileType.File:
            continue
        local = scratch / f"ckpt-{i}.pt"
        pyarrow.fs.copy_files(f"{path}/{checkpoint.CKPT_NAME}", str(local), source_filesystem=filesystem)
        states.append(checkpoint.load(local))
    assert states, f"no checkpoint with its {checkpoint.CKPT_NAME} in {storage}/{run_name}"
    return max(states, key=lambda state: state["iter_num"])


def list_checkpoints(storage: str, run_name: str) -> list[str]:
    return list_folders(join_uri(storage, run_name), "checkpoint_")  # oldest first: Ray names them by time


def tool(module: str, *argv) -> subprocess.CompletedProcess:
    """A raygpt command-line tool run as a user would, from this (the driver's) machine."""
    return subprocess.run([sys.executable, "-m", module, *map(str, argv)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)  # fmt: skip


def nodes_with_a_copy(cluster, data_dir: str) -> set[str]:
    """The nodes whose own cache holds a staged copy of the dataset: those that ran a worker."""
    uri = dataset_uri(data_dir, "shakespeare_char")
    return {
        name for name, node in cluster.nodes.items() if (cache_folder(uri, node.data_cache) / "train.bin").is_file()
    }


def assert_no_cross_node_reads(cluster, out_dir) -> None:
    assert not cluster.cross_node_reads([out_dir, cluster.root])


def nodes_running(cluster, actor: str) -> list[str]:
    """The nodes with a process of Ray actor class `actor` (Ray titles it ray::<class>...)."""
    return [
        name
        for name, node in cluster.nodes.items()
        for process in node.processes()
        if any(actor in part for part in command_line(process))
    ]


def command_line(process) -> list[str]:
    """A process's command line; none for one that has exited (or is a zombie) since it was listed."""
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def test_two_workers_on_two_nodes_each_staging_its_own_copy(ray_nodes, s3_server, shakespeare_path, tmp_path):
    """Checkpoints in a local storage_path here; the other tests keep theirs in S3."""
    data_dir = prepared_dataset(s3_server, shakespeare_path)  # a fresh URI: no node has a copy yet
    storage = storage_for("local", s3_server, tmp_path)
    values = {**TINY_RUN, **TWO_WORKERS, "data_dir": data_dir, "storage_path": storage, "out_dir": tmp_path / "out"}
    returncode, output = finish(start_run(ray_nodes, values))
    assert returncode == 0, output[-3000:]
    # One CPU a node, one a worker: the two workers ran on two nodes, and each node staged its own copy.
    assert len(nodes_with_a_copy(ray_nodes, data_dir)) == 2, output[-3000:]
    assert newest_state(storage, "out", tmp_path)["iter_num"] == TINY_RUN["max_iters"]
    assert_no_cross_node_reads(ray_nodes, tmp_path / "out")


@pytest.fixture(scope="module")
def reference_run(ray_nodes, s3_data, tmp_path_factory) -> tuple[dict, dict]:
    """An uninterrupted two-worker run of FAULT_RUN on this cluster: its CLI values and its final state."""
    scratch = tmp_path_factory.mktemp("reference")
    storage = str(scratch / "ray")
    values = {**FAULT_RUN, "data_dir": s3_data, "storage_path": storage, "out_dir": scratch / "out"}
    returncode, output = finish(start_run(ray_nodes, values))
    assert returncode == 0, output[-3000:]
    return values, newest_state(storage, "out", scratch)


@pytest.fixture(scope="module")
def reference(reference_run) -> dict:
    return reference_run[1]


def test_a_killed_node_is_replaced_by_a_spare_and_the_run_ends_bit_identical(
    ray_nodes, s3_server, s3_data, tmp_path, reference
):
    storage = storage_for("s3", s3_server, tmp_path)
    values = {**FAULT_RUN, "data_dir": s3_data, "storage_path": storage, "out_dir": tmp_path / "out", "max_failures": 1}
    process = start_run(ray_nodes, values)
    wait_for(process, r"saved checkpoint")
    wait_until_registered(process, storage, "out")
    wait_for(process, r"iter \d+:")
    # A node that runs a training worker and not Ray Train's controller (its loss would end the run).
    workers, controller = nodes_running(ray_nodes, "RayTrainWorker"), nodes_running(ray_nodes, "TrainController")
    victims = [name for name in workers if name not in controller]
    assert victims, f"workers on {workers}, controller on {controller}"
    ray_nodes.nodes[victims[0]].kill()
    try:
        returncode, output = finish(process)
    finally:
        ray_nodes.replace(victims[0])  # a new machine, so later tests have a spare again
    assert returncode == 0, output[-3000:]
    state = newest_state(storage, "out", tmp_path)
    # The new worker group continued from a Ray checkpoint, and ended where the uninterrupted run did.
    assert "checkpoint_" in (state["resumed_from"] or ""), output[-3000:]
    assert_bit_identical(state, reference)
    assert_no_cross_node_reads(ray_nodes, tmp_path / "out")


def test_a_rerun_without_out_dir_continues_from_storage_bit_identical(
    ray_nodes, s3_server, s3_data, tmp_path, reference
):
    """A killed driver, then the same command on a new machine: out_dir is gone, only object storage remains."""
    storage = storage_for("s3", s3_server, tmp_path)
    out_dir = tmp_path / "out"
    values = {**FAULT_RUN, "data_dir": s3_data, "storage_path": storage, "out_dir": out_dir}
    started = time.time()
    process = start_run(ray_nodes, values)
    wait_for(process, r"saved checkpoint")
    wait_until_registered(process, storage, "out")
    os.killpg(process.pid, signal.SIGKILL)  # the launcher only: Ray ends its job's workers
    finish(process)
    shutil.rmtree(out_dir)
    wait_until_reaped(started)
    returncode, output = finish(start_run(ray_nodes, values))
    assert returncode == 0, output[-3000:]
    assert "continuing run 'out'" in output, output[-3000:]
    state = newest_state(storage, "out", tmp_path)
    assert "checkpoint_" in (state["resumed_from"] or ""), output[-3000:]
    assert_bit_identical(state, reference)
    # sample and export read the checkpoint straight from object storage
    newest = join_uri(storage, "out", list_checkpoints(storage, "out")[-1])
    sampled = tool("raygpt.sample", "--checkpoint", newest, "--num-samples=1", "--max-new-tokens=20", "--start=ROMEO:")
    assert sampled.returncode == 0 and sampled.stdout.startswith("ROMEO:"), sampled.stderr[-2000:]
    exported = tool("raygpt.export", newest, "--ckpt", tmp_path / "exported.pt")
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert checkpoint.load(tmp_path / "exported.pt")["iter_num"] == FAULT_RUN["max_iters"]


def test_eval_only_on_another_node_than_the_driver(ray_nodes, reference_run):
    values, _ = reference_run
    returncode, output = finish(start_run(ray_nodes, {**values, "eval_only": True}))
    assert returncode == 0, output[-3000:]
    assert re.search(rf"eval at iter {FAULT_RUN['max_iters']}: train loss [\d.]+, val loss [\d.]+", output), output
    assert_no_cross_node_reads(ray_nodes, values["out_dir"])
