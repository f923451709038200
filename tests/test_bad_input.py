"""Every bad input is one clear line and a non-zero exit, before any worker starts where it can be."""

import shutil

import numpy as np
import pytest
import torch

from raygpt import launch
from raygpt.core import checkpoint

QUICK = [
    "--dataset=chars",  # not a name the launcher prepares itself, so damage is reported, not re-prepared
    "--n_layer=1",
    "--n_head=2",
    "--n_embd=16",
    "--block_size=16",
    "--batch_size=4",
    "--gradient_accumulation_steps=2",
    "--max_iters=4",
    "--eval_interval=2",
    "--eval_iters=2",
    "--device=cpu",
    "--compile=False",
    "--dtype=float32",
    "--warmup_iters=1",
    "--lr_decay_iters=10",
]


@pytest.fixture
def paths(tmp_path, char_data):
    data = tmp_path / "data"
    shutil.copytree(char_data / "shakespeare_char", data / "chars")
    return [f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", f"--storage_path={tmp_path / 'ray'}"], data


def run_cli(argv, capsys) -> tuple[int, str]:
    code = launch.main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip()


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize(
    "damage, needles",
    [
        ("no_folder", ["not found; create it with `python -m raygpt.prepare"]),
        ("no_train", ["train.bin is missing"]),
        # meta.json records each file's size: a cut file is met by that check before the token counts
        ("empty_val", ["val.bin has 0 bytes but meta.json records"]),
        ("short_val", ["val.bin has 20 bytes but meta.json records"]),
        ("big_token", ["holds token id 999 but the model's vocab_size is 65"]),
        ("bad_meta", ["meta.json is not valid JSON"]),
    ],
)
def test_bad_data(ray_local, paths, capsys, damage, needles):
    argv, data = paths
    dataset = data / "chars"
    if damage == "no_folder":
        argv = [*argv, "--dataset=nothing_here"]
    elif damage == "no_train":
        (dataset / "train.bin").unlink()
    elif damage == "empty_val":
        (dataset / "val.bin").write_bytes(b"")
    elif damage == "short_val":
        np.zeros(10, dtype=np.uint16).tofile(dataset / "val.bin")
    elif damage == "big_token":
        tokens = np.fromfile(dataset / "train.bin", dtype=np.uint16)
        tokens[5] = 999
        tokens.tofile(dataset / "train.bin")
    elif damage == "bad_meta":
        (dataset / "meta.json").write_text("{oops")
    assert_one_line_error(*run_cli([*QUICK, *argv], capsys), *needles)


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--learning_rat=1"], ["did you mean 'learning_rate'"]),
        (["--num_workers=3"], ["gradient_accumulation_steps (2) must be divisible by the number of workers (3)"]),
        (["--use_gpu=True", "--device=cuda"], ["1 GPU worker needs 1 GPU but the cluster has", "0 GPUs"]),
        (["--num_workers=64"], ["64 workers x 1 CPU need 64 CPUs but the cluster has 4 CPUs"]),
        (["--dtype=float16"], ["float16 needs a GPU"]),
        (["--init_from=resume"], ["init_from=resume but there is no checkpoint"]),
    ],
)
def test_bad_config_and_resources(ray_local, paths, capsys, extra, needles):
    argv, _ = paths
    if extra == ["--num_workers=64"]:
        extra = [*extra, "--gradient_accumulation_steps=64"]
    assert_one_line_error(*run_cli([*QUICK, *argv, *extra], capsys), *needles)


def test_damaged_or_foreign_resume_checkpoint(ray_local, paths, capsys, tmp_path):
    argv, _ = paths
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ckpt.pt").write_bytes(b"\x00" * 100)
    assert_one_line_error(*run_cli([*QUICK, *argv, "--init_from=resume"], capsys), "damaged or truncated")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "out" / "ckpt.pt")
    assert_one_line_error(*run_cli([*QUICK, *argv, "--init_from=resume"], capsys), "not a GPT checkpoint")


def test_unwritable_output(ray_local, paths, capsys, tmp_path):
    argv, _ = paths
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_one_line_error(*run_cli([*QUICK, *argv, f"--out_dir={blocker / 'out'}"], capsys), "cannot create")


def test_architecture_conflict_on_resume(ray_local, paths, capsys, tmp_path):
    argv, _ = paths
    assert launch.main([*QUICK, *argv]) == 0
    capsys.readouterr()
    code, err = run_cli(
        [*QUICK, *argv, "--init_from=resume", "--n_layer=2", "--run_name=other", "--max_iters=6"], capsys
    )
    # Refused in the driver, before any worker starts, with the ways out.
    assert_one_line_error(code, err, "was trained with another model or data: n_layer=2 (checkpoint: 1)", "--fresh")


def test_damaged_latest_checkpoint_falls_back_to_the_previous(ray_local, paths, capsys, tmp_path):
    argv, _ = paths
    assert launch.main([*QUICK, *argv, "--run_name=fallback"]) == 0
    checkpoints = sorted(p for p in (tmp_path / "ray" / "fallback").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2  # iters 2 and 4
    latest = checkpoints[-1] / "ckpt.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # a crash mid-copy
    # out_dir's copy of the latest (iter 4) would win over the previous Ray checkpoint (by iteration).
    (tmp_path / "out" / "ckpt.pt").unlink()
    assert launch.main([*QUICK, *argv, "--run_name=fallback", "--max_iters=6"]) == 0
    state = checkpoint.load(tmp_path / "out" / "ckpt.pt")
    assert state["iter_num"] == 6
    assert state["resumed_from"] == str(checkpoints[0] / "ckpt.pt")  # the previous one, intact


def test_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(ray_local, paths, capsys, tmp_path):
    argv, _ = paths
    assert launch.main([*QUICK, *argv, "--run_name=nan"]) == 0
    good = checkpoint.load(tmp_path / "out" / "ckpt.pt")
    # An absurd learning rate drives the weights to inf/nan within a few steps.
    code = launch.main(
        [
            *QUICK,
            *argv,
            "--run_name=nan",
            "--max_iters=40",
            "--learning_rate=1e30",
            "--min_lr=1e29",
            "--grad_clip=0",
            "--max_nonfinite_steps=3",
            "--eval_interval=100",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "consecutive steps with a non-finite loss or gradient" in err
    after = checkpoint.load(tmp_path / "out" / "ckpt.pt")
    assert after["iter_num"] == good["iter_num"] == 4
    assert all(torch.isfinite(t).all() for t in after["model"].values())
