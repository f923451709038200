"""Data and checkpoints in object storage (a real S3-compatible server on loopback): a run reads its
dataset from s3://, Ray writes its checkpoints to s3://, and a rerun on a machine whose out_dir is gone
continues from them; sample and export read a checkpoint straight from s3://."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_LOCAL_RUN

from raygpt import checkpoint
from raygpt.prepare import main as prepare_main
from raygpt.storage import join_uri, list_folders, read_small_file

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
RAY_RUN = [arg for arg in TINY_LOCAL_RUN if not arg.startswith("--local_mode")]


def cli(module: str, *argv, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", module, *map(str, argv)], capture_output=True, text=True, env=env,
                          timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def s3_dataset(s3_server, shakespeare_path) -> str:
    data = join_uri(s3_server.create_bucket(), "data")
    assert prepare_main(["shakespeare_char", "--data-dir", data, "--input", str(shakespeare_path)]) == 0
    return data


def test_a_run_with_data_and_checkpoints_in_s3_continues_without_its_out_dir(
    s3_server, s3_dataset, ray_local, tmp_path
):
    storage = join_uri(s3_server.create_bucket(), "ray")
    out = tmp_path / "out-s3"
    argv = [*RAY_RUN, f"--address={ray_local}", "--num_workers=2", "--gradient_accumulation_steps=2",
            f"--data_dir={s3_dataset}", f"--storage_path={storage}", f"--out_dir={out}",
            "--run_name=s3-run"]  # fmt: skip
    first = cli("raygpt.launch", *argv)
    assert first.returncode == 0, first.stderr[-3000:]
    run = join_uri(storage, "s3-run")
    checkpoints = list_folders(run, "checkpoint_")
    assert checkpoints, first.stdout[-2000:]
    summary = json.loads(read_small_file(join_uri(run, checkpoints[-1], checkpoint.SUMMARY_NAME)))
    assert summary["iter_num"] == 4 and summary["config"]["data_dir"] == s3_dataset

    shutil.rmtree(out)  # a new machine: nothing local survives, only what is in object storage
    second = cli("raygpt.launch", *argv, "--max_iters=6")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "continuing run 's3-run'" in second.stdout and "from iter 4" in second.stdout, second.stdout[-2000:]
    newest = list_folders(run, "checkpoint_")[-1]
    assert json.loads(read_small_file(join_uri(run, newest, checkpoint.SUMMARY_NAME)))["iter_num"] == 6
    assert "s3-run" in (checkpoint.load(out / "ckpt.pt")["resumed_from"] or ""), "resumed from Ray's storage"

    sampled = cli("raygpt.sample", "--checkpoint", join_uri(run, newest), "--num-samples=1",
                  "--max-new-tokens=20", "--start=ROMEO:")  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    assert sampled.stdout.startswith("ROMEO:"), sampled.stdout
    exported = cli("raygpt.export", join_uri(run, newest), "--ckpt", tmp_path / "exported.pt")
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert checkpoint.load(tmp_path / "exported.pt")["iter_num"] == 6


def test_a_missing_or_unreachable_dataset_uri_is_one_line_before_ray_starts(s3_server, tmp_path):
    bucket = s3_server.create_bucket()
    argv = [*TINY_LOCAL_RUN, f"--out_dir={tmp_path / 'out'}", f"--storage_path={tmp_path / 'ray'}"]
    missing = cli("raygpt.launch", *argv, "--dataset=owt", f"--data_dir={bucket}/nothing-here")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert missing.stderr.startswith("error: ") and f"{bucket}/nothing-here/owt" in missing.stderr
