"""Which run a launch is, and which of a run's checkpoints is newest.

A run's identity (`raygpt-run.json` in out_dir and in Ray's run folder) keeps two projects whose out_dirs
share a name from sharing a Ray run; a resume takes the latest iteration among Ray's checkpoints (whole
or sharded) and out_dir/ckpt.pt, in either mode. Runs are the real CLI in local mode; a Ray-mode launch
is taken as far as Ray's start (preflight), where every decision here is made. A Ray run is made here
as a Ray run leaves it: checkpoint folders with summary.json, and the run's record.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_LOCAL_RUN as TINY

from raygpt import launch
from raygpt.config.cli import read_config
from raygpt.core import checkpoint
from raygpt.core.model import GPT, GPTConfig
from raygpt.driver.identity import RECORD_NAME
from raygpt.driver.preflight import absolute_paths, preflight
from raygpt.driver.runlock import LOCK_NAME, RunLock
from raygpt.errors import RaygptError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def data(tmp_path, char_data):
    target = tmp_path / "data"
    shutil.copytree(char_data / "shakespeare_char", target / "shakespeare_char")
    return target


def args(data, out: Path, storage: Path, *more) -> list[str]:
    return [*TINY, f"--data_dir={data}", f"--out_dir={out}", f"--storage_path={storage}", *more]


def cli(argv, capsys) -> tuple[int, str, str]:
    code = launch.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def assert_refused(code, err, *needles):
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err


def ray_launch(argv):
    """A Ray-mode launch of `argv` up to Ray's start: what it would continue (or its refusal)."""
    cfg, keys = read_config([*argv, "--local_mode=False"])
    checked = preflight(absolute_paths(cfg), keys, None)
    checked.discard()
    return checked


def as_ray_run(out: Path, storage: Path, run_name: str, state_path: Path, stamp: int, sharded: bool = False) -> Path:
    """Ray run `run_name` of out_dir `out` holding the checkpoint at `state_path`, as a Ray run leaves it:
    its record, and a checkpoint folder (whole, or sharded as FSDP writes it) with summary.json."""
    run = storage / run_name
    run.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / RECORD_NAME, run / RECORD_NAME)
    folder = run / f"checkpoint_2026-12-06_10-00-{stamp:02d}.000000"
    folder.mkdir()
    saved = checkpoint.load(state_path)
    if sharded:
        import torch.distributed.checkpoint as dcp

        model = GPT(GPTConfig(**saved["model_args"]))
        optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", False)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        state = checkpoint.TrainState(model, optimizer, scaler, saved["model_args"], saved["config"], False)
        state.load_state_dict(saved, str(state_path))
        dcp.save(state.sharded_state_dict(), checkpoint_id=str(folder), no_dist=True)
        checkpoint.save_atomic(state.progress(None), folder / checkpoint.PROGRESS_NAME)
    else:
        shutil.copy(state_path, folder / checkpoint.CKPT_NAME)
    summary = {key: saved[key] for key in ("model_args", "iter_num", "config")}
    (folder / checkpoint.SUMMARY_NAME).write_text(json.dumps(summary))
    return folder


# ---- 1. Which run is this? ------------------------------------------------------------------------------


def test_a_new_folder_named_like_another_projects_out_dir_does_not_continue_its_run(tmp_path, data, capsys):
    """Two projects whose out_dirs are both `.../out`, one storage: project B's first launch used to
    continue project A's Ray run 'out'. Now Ray mode refuses in one line, each way out it names works,
    and local mode (which writes no Ray storage) starts B's own run."""
    storage, a_out, b_out = tmp_path / "ray", tmp_path / "a" / "out", tmp_path / "b" / "out"
    assert cli(args(data, a_out, storage), capsys)[0] == 0
    as_ray_run(a_out, storage, "out", a_out / "ckpt.pt", 1)
    b_args = args(data, b_out, storage, "--max_iters=8")
    with pytest.raises(RaygptError) as refused:
        ray_launch(b_args)
    message = str(refused.value)
    assert message.startswith(f"Ray run 'out' in {storage} is run ")
    assert f"of out_dir {a_out}, not of out_dir {b_out}:" in message
    assert "pass --run_name=NEW" in message and f"--out_dir={a_out} to continue that one" in message
    assert "\n" not in message and not b_out.exists()  # a refused launch leaves nothing behind
    assert ray_launch([*b_args, "--run_name=b-run"]).resume is None  # a new run of its own
    assert ray_launch([*b_args[:-1], f"--out_dir={a_out}", "--max_iters=8"]).resume.summary["iter_num"] == 4
    capsys.readouterr()
    # Local mode leaves the other project's Ray run alone: B's own first run.
    code, stdout, err = cli(b_args, capsys)
    assert code == 0 and "continuing" not in stdout, err
    assert (
        json.loads((b_out / RECORD_NAME).read_text())["run_id"]
        != json.loads((a_out / RECORD_NAME).read_text())["run_id"]
    )


def test_a_ray_run_from_before_run_records_is_known_by_its_checkpoints_out_dir(tmp_path, data, capsys):
    storage, a_out, b_out = tmp_path / "ray", tmp_path / "a" / "out", tmp_path / "b" / "out"
    assert cli(args(data, a_out, storage), capsys)[0] == 0
    as_ray_run(a_out, storage, "out", a_out / "ckpt.pt", 1)
    (storage / "out" / RECORD_NAME).unlink()
    (a_out / RECORD_NAME).unlink()
    with pytest.raises(RaygptError, match=f"is the run of out_dir {a_out}, not of out_dir {b_out}: pass --run_name"):
        ray_launch(args(data, b_out, storage, "--max_iters=8"))
    assert ray_launch(args(data, a_out, storage, "--max_iters=8")).resume.summary["iter_num"] == 4  # its own


def test_an_out_dir_and_a_ray_run_of_two_runs_are_refused_naming_both(tmp_path, data, capsys):
    storage, a_out, b_out = tmp_path / "ray", tmp_path / "a" / "out", tmp_path / "b" / "out"
    for out in (a_out, b_out):
        assert cli(args(data, out, storage), capsys)[0] == 0
    as_ray_run(a_out, storage, "out", a_out / "ckpt.pt", 1)
    b_id = json.loads((b_out / RECORD_NAME).read_text())["run_id"]
    with pytest.raises(RaygptError, match=f"not of out_dir {b_out} \\(run {b_id[:8]}\\): pass --run_name=NEW"):
        ray_launch(args(data, b_out, storage, "--max_iters=8"))
    # The way out: B's run continues from its own ckpt.pt under a Ray run name of its own.
    checked = ray_launch(args(data, b_out, storage, "--max_iters=8", "--run_name=b-run"))
    assert checked.resume.source == b_out / "ckpt.pt" and checked.identity.run_id == b_id


def test_out_dirs_run_name_is_kept_for_a_rerun_without_it(tmp_path, data, capsys):
    """After following `--run_name=NEW`, the out_dir's run keeps that name: the plain command continues it."""
    storage, out = tmp_path / "ray", tmp_path / "out"
    assert cli(args(data, out, storage, "--run_name=mine"), capsys)[0] == 0
    code, stdout, err = cli(args(data, out, storage, "--max_iters=6"), capsys)
    assert code == 0 and "continuing run 'mine'" in stdout, err


def test_two_local_mode_runs_in_unrelated_folders_of_one_name_both_run(tmp_path, data):
    """Local mode writes no Ray storage, and takes no lock on a Ray run name: only its out_dir's."""
    storage = tmp_path / "ray"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    slow = args(
        data, tmp_path / "a" / "out", storage, "--max_iters=100000", "--eval_interval=100000", "--log_interval=1"
    )
    first = subprocess.Popen([sys.executable, "-m", "raygpt.launch", *slow], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    try:
        for line in first.stdout:  # training has started: its locks are held
            if line.startswith("iter "):
                break
        second = subprocess.run([sys.executable, "-m", "raygpt.launch", *args(data, tmp_path / "b" / "out", storage)],
                                capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
        assert second.returncode == 0, second.stderr
        assert not list(storage.glob(f"*{LOCK_NAME}"))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)


def test_a_held_ray_run_is_refused_with_a_way_out_that_works(tmp_path, data):
    storage, out = tmp_path / "ray", tmp_path / "out"
    held = RunLock()
    held.acquire(storage / f".out{LOCK_NAME}", "Ray run 'out'")
    try:
        with pytest.raises(
            RaygptError, match="Ray run 'out' in .* is in use .*; wait for it to end, or pass another --run_name$"
        ):
            ray_launch(args(data, out, storage))
        assert ray_launch(args(data, out, storage, "--run_name=other")).resume is None
    finally:
        held.release()


# ---- 2. Which checkpoint is newest? ---------------------------------------------------------------------


def test_ray_then_local_then_ray_continues_from_the_latest_iteration(tmp_path, data, capsys):
    """A Ray run to iter 4, local mode on to 8 (out_dir/ckpt.pt only), then Ray again: the last launch
    used to go back to Ray's checkpoint at 4 and overwrite the ckpt.pt at 8."""
    storage, out = tmp_path / "ray", tmp_path / "out"
    assert cli(args(data, out, storage), capsys)[0] == 0
    at_4 = as_ray_run(out, storage, "out", out / "ckpt.pt", 1)
    code, stdout, err = cli(args(data, out, storage, "--max_iters=8"), capsys)
    assert code == 0 and "from iter 4" in stdout, err
    assert checkpoint.load(out / "ckpt.pt")["iter_num"] == 8
    checked = ray_launch(args(data, out, storage, "--max_iters=12"))
    assert checked.resume.source == out / "ckpt.pt" and checked.resume.summary["iter_num"] == 8
    assert not checked.resume.in_ray_run  # the plan names it: resume_from
    # A worker handed Ray's latest (at 4) and the launcher's choice takes the latest iteration too.
    ray_latest = SimpleNamespace(path=str(at_4), filesystem=SimpleNamespace(type_name="local"))
    state, source = checkpoint.load_resume_state(ray_latest, fallback=str(out / "ckpt.pt"))
    assert state["iter_num"] == 8 and source == str(out / "ckpt.pt")


def test_local_mode_after_an_fsdp_run_continues_from_its_shards(tmp_path, data, capsys):
    """An FSDP run writes sharded checkpoints to Ray's storage only: local mode used to resume the older
    out_dir/ckpt.pt and drop the FSDP iterations."""
    storage, out, ahead = tmp_path / "ray", tmp_path / "out", tmp_path / "ahead"
    assert cli(args(data, out, storage), capsys)[0] == 0
    shutil.copytree(out, ahead)  # the FSDP run's iterations 4 to 8, trained in a copy
    assert cli(args(data, ahead, storage, "--max_iters=8", "--run_name=ahead"), capsys)[0] == 0
    sharded = as_ray_run(out, storage, "out", ahead / "ckpt.pt", 1, sharded=True)
    code, stdout, err = cli(args(data, out, storage, "--max_iters=10"), capsys)
    assert code == 0, err
    assert f"from iter 8 ({sharded}, the latest iteration of the run's checkpoints)" in stdout
    resumed = checkpoint.load(out / "ckpt.pt")
    assert resumed["iter_num"] == 10 and resumed["resumed_from"] == str(sharded)


def test_a_checkpoint_elsewhere_at_a_later_iteration_wins_a_tie_goes_to_rays(tmp_path):
    run = tmp_path / "run"
    summaries = {"checkpoint_1": 4, "checkpoint_2": 6}
    for name, iter_num in summaries.items():
        (run / name).mkdir(parents=True)
        (run / name / checkpoint.SUMMARY_NAME).write_text(json.dumps({"iter_num": iter_num}))
    candidates = checkpoint.resume_candidates(run / "checkpoint_2", fallback=tmp_path / "ckpt.pt")
    iterations = {run / "checkpoint_1": 4, run / "checkpoint_2": 6}
    assert checkpoint.by_iteration(candidates, lambda c: iterations.get(c, 8))[0] == tmp_path / "ckpt.pt"
    assert checkpoint.by_iteration(candidates, lambda c: iterations.get(c, 6))[0] == run / "checkpoint_2"
    assert checkpoint.by_iteration(candidates, lambda c: iterations.get(c))[-1] == tmp_path / "ckpt.pt"
    assert [checkpoint.iteration_of(run / name) for name in summaries] == [4, 6]


@pytest.mark.ray
def test_ray_then_local_then_ray_on_a_real_cluster(ray_local, tmp_path, data, capsys):
    """The whole sequence with real Ray runs: the last Ray run goes on from local mode's iter 8, and a
    second project's out_dir of the same name is refused before Ray's run starts."""
    storage, out = tmp_path / "ray", tmp_path / "a" / "out"
    on_ray = ["--local_mode=False", "--num_workers=1", "--cpus_per_worker=1"]
    assert cli(args(data, out, storage, *on_ray), capsys)[0] == 0
    assert json.loads((storage / "out" / RECORD_NAME).read_text()) == json.loads((out / RECORD_NAME).read_text())
    assert cli(args(data, out, storage, "--max_iters=8"), capsys)[0] == 0
    code, stdout, err = cli(args(data, out, storage, "--max_iters=12", *on_ray), capsys)
    assert code == 0 and f"from iter 8 ({out / 'ckpt.pt'}, the latest iteration" in stdout, err
    resumed = checkpoint.load(out / "ckpt.pt")
    assert resumed["iter_num"] == 12 and resumed["resumed_from"] == str(out / "ckpt.pt")
    code, _, err = cli(args(data, tmp_path / "b" / "out", storage, *on_ray), capsys)
    assert_refused(code, err, f"of out_dir {out}, not of out_dir {tmp_path / 'b' / 'out'}", "--run_name=NEW")
