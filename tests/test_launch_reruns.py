"""The launcher's decisions before any worker starts: reruns, fresh starts, the run lock, leftovers,
first-run data preparation, wandb credentials, memory, and the one-line endings of failed runs.

Every run here is the real CLI in local mode (no Ray processes), in-process through launch.main or as a
subprocess where the user's process boundary matters (locks, signals, the network).
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_LOCAL_RUN as TINY

from raygpt import launch
from raygpt.config.cli import read_config
from raygpt.core import checkpoint
from raygpt.driver.plan import plan_resume
from raygpt.driver.preflight import absolute_paths, dataset_meta
from raygpt.errors import LaunchError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_args(tmp_path, char_data):
    data = tmp_path / "data"
    shutil.copytree(char_data / "shakespeare_char", data / "shakespeare_char")
    out = tmp_path / "out-run"
    return [*TINY, f"--data_dir={data}", f"--out_dir={out}", f"--storage_path={tmp_path / 'ray'}"], out


def cli(argv, capsys) -> tuple[int, str, str]:
    code = launch.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def assert_refused(code, err, *needles):
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err


def test_rerun_at_max_iters_has_nothing_to_do_and_says_how_to_go_on(run_args, capsys):
    """A finished run's rerun is no error: exit 0 with the line that says how to train further. What
    cannot happen stays a refusal: a new run asked for (--init_from=scratch) where checkpoints are."""
    argv, out = run_args
    assert cli(argv, capsys)[0] == 0
    before = (out / "ckpt.pt").stat().st_mtime_ns
    rerun = subprocess.run([sys.executable, "-m", "raygpt.launch", *argv], capture_output=True, text=True,
                           env=subprocess_env(), timeout=120)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.strip().splitlines()[-1] == (
        f"raygpt: run 'out-run' ({out / 'ckpt.pt'}) is already at iter 4 (max_iters 4): nothing to do; pass a "
        "larger --max_iters (and --lr_decay_iters) to train further, --eval_only=True to evaluate it, or --fresh"
    )
    assert "error" not in rerun.stderr and "Traceback" not in rerun.stderr, rerun.stderr
    code, _, err = cli([*argv, "--init_from=scratch"], capsys)
    assert_refused(code, err, "init_from=scratch, but run 'out-run'", "--fresh")
    assert (out / "ckpt.pt").stat().st_mtime_ns == before


def test_a_sweeps_trials_neither_continue_nor_are_refused_by_a_finished_run(run_args, capsys):
    """A sweep of the same config (raygpt.tune) makes new runs, one a trial: the finished run under the
    base config's names does not refuse it, and no trial continues it."""
    argv, out = run_args
    assert cli(argv, capsys)[0] == 0
    cfg, keys = read_config(argv)
    cfg = absolute_paths(cfg)
    meta = dataset_meta(cfg, None)
    with pytest.raises(LaunchError, match="already at iter 4"):
        plan_resume(cfg, out.name, keys, meta)
    assert plan_resume(cfg, out.name, keys, meta, new_runs=True) is None


def test_rerun_with_more_iters_continues_and_names_what_changed(run_args, capsys):
    argv, out = run_args
    assert cli(argv, capsys)[0] == 0
    code, stdout, err = cli([*argv, "--max_iters=6", "--learning_rate=1e-3"], capsys)
    assert code == 0, err
    # max_iters may change silently (it is how a run is continued); learning_rate is named.
    assert (
        "continuing run 'out-run'" in stdout and "from iter 4; changed since: learning_rate 0.0006 -> 0.001" in stdout
    )
    assert checkpoint.load(out / "ckpt.pt")["iter_num"] == 6


MODEL_FLAGS = ("--n_layer=", "--n_head=", "--n_embd=", "--block_size=", "--bias=")


def test_a_rerun_without_the_model_flags_keeps_the_checkpoints_shape_and_says_nothing_false(run_args, capsys):
    """The model keys left at their defaults (n_layer 12, block_size 1024) are not changes: the checkpoint's
    shape is kept, and it is what the run says, counts and saves."""
    argv, out = run_args
    assert cli(argv, capsys)[0] == 0
    rerun = [a for a in argv if not a.startswith(MODEL_FLAGS)]
    code, stdout, err = cli([*rerun, "--max_iters=6", "--learning_rate=1e-3"], capsys)
    assert code == 0, err
    assert "from iter 4; changed since: learning_rate 0.0006 -> 0.001\n" in stdout, stdout
    assert "tokens per iteration will be: 64" in stdout  # 1 x 4 x the checkpoint's block_size 16
    saved = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert saved["iter_num"] == 6
    assert {k: saved["config"][k] for k in ("n_layer", "n_head", "n_embd", "block_size")} == {
        "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16
    }  # fmt: skip


def test_a_rerun_checks_the_data_against_the_models_block_size(tmp_path, capsys):
    """A dataset too short for the default block_size (1024) but long enough for the checkpoint's (16)."""
    from raygpt.prep.shakespeare import prepare_shakespeare_char

    corpus = tmp_path / "short.txt"
    corpus.write_text("First Citizen: we are accounted poor citizens, the patricians good.\n" * 12)
    prepare_shakespeare_char(tmp_path / "data", input_path=corpus)
    argv = [
        *TINY,
        f"--data_dir={tmp_path / 'data'}",
        f"--out_dir={tmp_path / 'out'}",
        f"--storage_path={tmp_path / 'ray'}",
    ]
    assert cli(argv, capsys)[0] == 0
    rerun = [a for a in argv if not a.startswith(MODEL_FLAGS)]
    code, stdout, err = cli([*rerun, "--max_iters=6"], capsys)
    assert code == 0, err
    assert "continuing run 'out'" in stdout and "from iter 4\n" in stdout
    # The model keys a new run is given are still checked against the data.
    code, _, err = cli([*rerun, f"--out_dir={tmp_path / 'other'}"], capsys)
    assert_refused(code, err, "too few for block_size 1024")


def test_max_iters_0_evaluates_and_names_no_checkpoint_it_did_not_write(run_args, capsys):
    argv, out = run_args
    code, stdout, err = cli([*argv, "--max_iters=0"], capsys)
    assert code == 0, err
    assert not (out / "ckpt.pt").exists()
    last = stdout.strip().splitlines()[-1]
    assert "no checkpoint was saved: the run ended at iter 0, which is never saved (max_iters=0)" in last
    assert "ckpt.pt" not in stdout


def test_the_summary_of_a_ray_run_without_checkpoints_names_none(capsys):
    from types import SimpleNamespace

    from raygpt.config.schema import TrainConfig
    from raygpt.driver.trainer import summarize

    metrics = {"iter": 0, "val_loss": 4.2, "best_val_loss": 4.2}
    summarize(SimpleNamespace(best_checkpoints=[], checkpoint=None, metrics=metrics, path="/runs/r"), TrainConfig())
    assert capsys.readouterr().out.splitlines() == [
        "no checkpoint was saved: the run ended at iter 0, which is never saved (max_iters=600000)",
        "run folder: /runs/r",
    ]


def test_explicit_scratch_and_a_different_model_are_refused_with_the_ways_out(run_args, capsys):
    argv, out = run_args
    assert cli(argv, capsys)[0] == 0
    saved = checkpoint.load(out / "ckpt.pt")
    code, _, err = cli([*argv, "--max_iters=8", "--init_from=scratch"], capsys)
    assert_refused(code, err, "init_from=scratch, but run 'out-run'", "pass another --out_dir", "--fresh")
    code, _, err = cli([*argv, "--max_iters=8", "--n_layer=2"], capsys)
    assert_refused(code, err, "another model or data: n_layer=2 (checkpoint: 1)")
    assert checkpoint.load(out / "ckpt.pt")["iter_num"] == saved["iter_num"]
    # Each way out works as printed: another out_dir, and --fresh, are new runs.
    other = out.with_name("other-out")
    code, stdout, err = cli([*argv, "--max_iters=8", "--n_layer=2", f"--out_dir={other}"], capsys)
    assert code == 0 and "continuing" not in stdout, err
    assert checkpoint.load(other / "ckpt.pt")["model_args"]["n_layer"] == 2
    assert cli([*argv, "--max_iters=8", "--init_from=scratch", "--fresh"], capsys)[0] == 0
    assert checkpoint.load(out / "ckpt.pt")["iter_num"] == saved["iter_num"]


def test_fresh_starts_a_new_run_beside_the_old_one(run_args, capsys):
    argv, out = run_args
    assert cli(argv, capsys)[0] == 0
    old = (out / "ckpt.pt").read_bytes()
    code, stdout, err = cli([*argv, "--fresh", "--n_layer=2"], capsys)
    assert code == 0, err
    fresh = out.with_name("out-run-2")
    assert f"a new run 'out-run-2' in {fresh}" in stdout
    assert checkpoint.load(fresh / "ckpt.pt")["model_args"]["n_layer"] == 2
    assert (out / "ckpt.pt").read_bytes() == old  # nothing of the old run is touched


def test_a_diverging_resume_keeps_the_last_good_checkpoint(run_args, capsys):
    argv, out = run_args
    assert cli(argv, capsys)[0] == 0
    good = checkpoint.load(out / "ckpt.pt")
    diverge = [*argv, "--max_iters=12", "--learning_rate=1e6", "--min_lr=1", "--max_nonfinite_steps=0"]
    code, stdout, err = cli(diverge, capsys)
    assert code == 0, err
    assert "no checkpoint: non-finite losses or gradients" in stdout
    after = checkpoint.load(out / "ckpt.pt")
    assert after["iter_num"] == good["iter_num"] and torch.equal(
        after["model"]["transformer.wte.weight"], good["model"]["transformer.wte.weight"]
    )
    # ... and a rerun from it still works (nothing non-finite was stored anywhere).
    assert cli([*argv, "--max_iters=6"], capsys)[0] == 0


def test_a_nanogpt_checkpoint_with_tensor_numbers_resumes(run_args, capsys):
    """nanoGPT saves best_val_loss as a 0-dim tensor and iter_num as an int; both must come out as numbers."""
    argv, out = run_args
    assert cli(argv, capsys)[0] == 0
    state = checkpoint.load(out / "ckpt.pt")
    nanogpt_style = {k: state[k] for k in ("model", "optimizer", "model_args", "iter_num", "config")}
    nanogpt_style["best_val_loss"] = torch.tensor(state["best_val_loss"])
    shutil.rmtree(out)
    foreign = out.with_name("nanogpt-out")
    foreign.mkdir()
    torch.save(nanogpt_style, foreign / "ckpt.pt")
    code, stdout, err = cli([*argv, f"--out_dir={foreign}", "--init_from=resume", "--max_iters=6"], capsys)
    assert code == 0, err
    resumed = checkpoint.load(foreign / "ckpt.pt")
    assert resumed["iter_num"] == 6 and isinstance(resumed["best_val_loss"], float)


def test_leftovers_of_a_killed_save_are_removed_at_start(run_args, capsys):
    argv, out = run_args
    out.mkdir(parents=True)
    (out / ".ckpt.pt.k1l3d.tmp").write_bytes(b"half a checkpoint")
    (out / ".ray-upload-abc").mkdir()
    code, stdout, err = cli(argv, capsys)
    assert code == 0, err
    assert "removed .ckpt.pt.k1l3d.tmp" in stdout
    assert not (out / ".ckpt.pt.k1l3d.tmp").exists() and not (out / ".ray-upload-abc").exists()


def test_a_run_that_cannot_fit_is_refused_before_building_the_model(run_args, capsys):
    argv, _ = run_args
    code, _, err = cli([*argv, "--n_layer=100000", "--n_embd=1024", "--n_head=16"], capsys)
    assert_refused(code, err, "this run needs about", "GiB", "--check_memory=False")


def test_wandb_without_credentials_is_refused_before_ray_starts(run_args, capsys, monkeypatch, tmp_path):
    argv, out = run_args
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    code, _, err = cli([*argv, "--wandb_log=True"], capsys)
    assert_refused(code, err, "wandb_log=True but WandB has no credentials", "wandb login", "WANDB_MODE=offline")
    assert not (out / "ckpt.pt").exists()


def subprocess_env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def test_a_second_run_on_the_same_out_dir_is_refused_and_a_killed_one_releases_it(run_args):
    argv, out = run_args
    slow = [*argv, "--max_iters=100000", "--eval_interval=100000", "--log_interval=1"]
    first = subprocess.Popen([sys.executable, "-m", "raygpt.launch", *slow], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=subprocess_env())  # fmt: skip
    try:
        for line in first.stdout:  # training has started: the lock is held
            if line.startswith("iter "):
                break
        second = subprocess.run([sys.executable, "-m", "raygpt.launch", *argv, "--max_iters=2"],
                                capture_output=True, text=True, env=subprocess_env(), timeout=120)  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().startswith(f"error: out_dir {out} is in use by another raygpt run (pid ")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
        # The OS dropped the lock with the process: the same command runs at once.
        again = subprocess.run([sys.executable, "-m", "raygpt.launch", *argv],
                               capture_output=True, text=True, env=subprocess_env(), timeout=300)  # fmt: skip
        assert again.returncode == 0, again.stderr
    finally:
        if first.poll() is None:
            first.kill()


def test_ctrl_c_ends_in_one_line_saying_what_was_saved(run_args):
    argv, out = run_args
    slow = [*argv, "--max_iters=100000", "--eval_interval=4", "--log_interval=1"]
    process = subprocess.Popen([sys.executable, "-m", "raygpt.launch", *slow], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=subprocess_env())  # fmt: skip
    for line in process.stdout:
        if line.startswith("saved checkpoint"):
            break
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    last = err.strip().splitlines()[-1]
    assert last == (f"interrupted: the latest checkpoint is {out / 'ckpt.pt'}: run the same command again to "
                    "continue from it")  # fmt: skip


def test_offline_first_run_fails_in_one_line_and_a_partial_dataset_does_not_block_the_next(tmp_path, shakespeare_path):
    """The quick start without network: one line naming the launcher's own flag, and the folder that a
    failed preparation may leave does not stop the next command from preparing the dataset."""
    data = tmp_path / "data"
    (data / "shakespeare_char").mkdir(parents=True)  # what an interrupted earlier attempt could leave
    argv = [*TINY, f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}"]
    # A closed local port as the proxy: the download fails at once, whatever network the machine has.
    offline = subprocess_env(https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    failed = subprocess.run([sys.executable, "-m", "raygpt.launch", *argv], capture_output=True, text=True,
                            env=offline, timeout=300)  # fmt: skip
    assert failed.returncode == 2, failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "--prepare-input" in last and "--input " not in last, failed.stderr
    assert "Traceback" not in failed.stderr
    done = subprocess.run([sys.executable, "-m", "raygpt.launch", *argv, f"--prepare-input={shakespeare_path}"],
                          capture_output=True, text=True, env=offline, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (data / "shakespeare_char" / "meta.json").is_file() and (tmp_path / "out" / "ckpt.pt").is_file()


def test_launch_help_reads_like_a_tool(capsys):
    assert launch.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m raygpt.launch [CONFIG_FILE]")
    for option in ("--address ADDR", "--wait-for-resources", "--prepare-input FILE", "--fresh", "--verbose"):
        line = next(line for line in text.splitlines() if line.strip().startswith(option))
        assert len(line.strip()) > len(option) + 10, f"{option} has no help: {line!r}"  # a description follows
    assert "`" not in text.split("config keys")[0]
    # Every key is listed with its default, and every description starts in the same column.
    import dataclasses

    from raygpt.config.schema import TrainConfig

    columns = set()
    for field in dataclasses.fields(TrainConfig):
        line = next(line for line in text.splitlines() if line.startswith(f"  --{field.name}="))
        columns.add(line.index(field.metadata["help"]))
    assert len(columns) == 1, columns


@pytest.mark.parametrize(
    "damage, needle",
    [
        ("folder", "ckpt.pt is a folder, not a checkpoint file"),
        ("iter_num", "iter_num must be a non-negative integer, got -3"),
        ("iter_text", "iter_num must be a number, got str"),
        ("model_args", "model_args['n_layer'] must be a positive int, got 'two'"),
        ("best_val_loss", "best_val_loss must be a number, got list"),
    ],
)
def test_a_malformed_resume_checkpoint_is_one_line_before_ray_starts(run_args, capsys, damage, needle):
    argv, out = run_args
    assert cli(argv, capsys)[0] == 0
    path = out / "ckpt.pt"
    if damage == "folder":
        path.unlink()
        path.mkdir()
    else:
        state = checkpoint.load(path)
        if damage == "iter_num":
            state["iter_num"] = -3
        elif damage == "iter_text":
            state["iter_num"] = "4"
        elif damage == "model_args":
            state["model_args"]["n_layer"] = "two"
        else:
            state["best_val_loss"] = [1.0]
        torch.save(state, path)
    code, stdout, err = cli([*argv, "--max_iters=8"], capsys)
    assert_refused(code, err, needle)
    assert "tokens per iteration" not in stdout  # no worker started
