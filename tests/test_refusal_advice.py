"""Every piece of advice a launcher refusal prints works as printed: each refusal is met, then its advice
is followed and the run goes on (or, for a Ray-mode refusal, its checks up to Ray's start pass).

Runs are the real CLI in local mode, in-process, for a few seconds each.
"""

import shutil

import pytest
import torch
from conftest import TINY_LOCAL_RUN as TINY

from raygpt import launch, tune
from raygpt.config.cli import read_config
from raygpt.core import checkpoint
from raygpt.driver.plan import check_workers
from raygpt.driver.preflight import absolute_paths, preflight


@pytest.fixture
def base(tmp_path, char_data):
    data = tmp_path / "data"
    shutil.copytree(char_data / "shakespeare_char", data / "shakespeare_char")
    return [*TINY, f"--data_dir={data}", f"--storage_path={tmp_path / 'ray'}"]


def cli(argv, capsys) -> tuple[int, str, str]:
    code = launch.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def refused(argv, capsys, *needles) -> str:
    code, _, err = cli(argv, capsys)
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_a_finished_run_s_three_ways_on_work(base, tmp_path, capsys):
    out = f"--out_dir={tmp_path / 'out'}"
    assert cli([*base, out], capsys)[0] == 0
    code, stdout, err = cli([*base, out], capsys)  # nothing to do: said, not refused
    assert code == 0 and "nothing to do" in stdout, err
    for advice in ("pass a larger --max_iters (and --lr_decay_iters)", "--eval_only=True", "--fresh"):
        assert advice in stdout, stdout
    code, stdout, err = cli([*base, out, "--eval_only=True"], capsys)
    assert code == 0 and "eval at iter 4" in stdout, err
    assert cli([*base, out, "--max_iters=6", "--lr_decay_iters=12"], capsys)[0] == 0
    code, stdout, err = cli([*base, out, "--max_iters=6", "--fresh"], capsys)
    assert code == 0 and "a new run 'out-2'" in stdout, err


def test_no_usable_checkpoint_names_fresh_and_fresh_works(base, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli([*base, f"--out_dir={out}"], capsys)[0] == 0
    (out / "ckpt.pt").write_bytes(b"not a checkpoint")
    refused([*base, f"--out_dir={out}", "--max_iters=6"], capsys, "no usable checkpoint", "--fresh starts a new run")
    code, _, err = cli([*base, f"--out_dir={out}", "--max_iters=6", "--fresh"], capsys)
    assert code == 0 and checkpoint.load(tmp_path / "out-2" / "ckpt.pt")["iter_num"] == 6, err
    assert (out / "ckpt.pt").read_bytes() == b"not a checkpoint"  # nothing is deleted


def test_local_mode_resource_refusals_advise_what_local_mode_takes(base, tmp_path, capsys):
    out = f"--out_dir={tmp_path / 'out'}"
    err = refused([*base, out, "--cpus_per_worker=100000"], capsys, "(lower --cpus_per_worker)")
    assert "--num-workers" not in err  # local mode runs one worker whatever is given
    assert cli([*base, out, "--cpus_per_worker=1"], capsys)[0] == 0
    err = refused([*base, f"--out_dir={tmp_path / 'half'}", "--dtype=float16"], capsys, "use --dtype=float32")
    assert cli([*base, f"--out_dir={tmp_path / 'half'}", "--dtype=float32"], capsys)[0] == 0
    if not torch.cuda.is_available():
        gpu = [arg for arg in base if arg != "--device=cpu"]
        err = refused([*gpu, f"--out_dir={tmp_path / 'gpu'}", "--use_gpu=True"], capsys, "(pass --use_gpu=False")
        assert "--wait-for-resources" not in err  # local mode never waits for a cluster
        assert cli([*gpu, f"--out_dir={tmp_path / 'gpu'}", "--use_gpu=False"], capsys)[0] == 0


def test_a_uri_out_dir_is_refused_and_the_uri_goes_to_storage_path(base, tmp_path, capsys):
    uri = (tmp_path / "bucket").as_uri()
    refused([*base, f"--out_dir={uri}"], capsys, "pass a local --out_dir, and the URI as --storage_path")
    assert cli([*base, f"--out_dir={tmp_path / 'out'}", f"--storage_path={uri}"], capsys)[0] == 0


@pytest.mark.parametrize(
    "workers, steps, advised",
    [(["--num_workers=3"], 4, [["--gradient_accumulation_steps=3"], ["--gradient_accumulation_steps=6"]]),
     (["--num-workers=1-3"], 4, [["--num-workers=1-2"], ["--num-workers=2-2"]])],
)  # fmt: skip
def test_worker_count_refusals_name_values_that_pass(base, tmp_path, capsys, workers, steps, advised):
    """Ray-mode refusals before Ray starts: the values they name pass the same check."""
    argv = [*base, f"--out_dir={tmp_path / 'out'}", "--local_mode=False", f"--gradient_accumulation_steps={steps}"]
    err = refused([*argv, *workers], capsys)
    for advice in advised:
        assert advice[0].split("=")[1].split("-")[-1] in err
        cfg, _ = read_config([*argv, *workers, *advice])
        check_workers(cfg, cfg.num_workers)  # what refused the run, now passed
        checked = preflight(absolute_paths(cfg), set(), None)
        checked.discard()


def test_refusals_name_no_flag_the_launcher_does_not_take(capsys):
    """Each --flag a launcher refusal names is a config key or a launcher option (no misspelt advice)."""
    import re
    from pathlib import Path

    from raygpt.config.schema import DEFAULTS

    options = {"address", "wait-for-resources", "prepare-input", "fresh", "verbose", "num-workers", "help"}
    options |= {
        "head",
        "no-compile",
        "data-dir",
        "logdir",
        "working-dir",
    }  # ray start, pip, prepare, tensorboard, ray job
    options |= {"key", "f", "add"}  # usage's `--key=value`; launch.py's note on abbreviated options
    sweep = tune.build_parser()  # the sweep's own options, which driver/sweep_*.py advise
    options |= {flag[2:] for action in sweep._actions for flag in action.option_strings if flag.startswith("--")}
    sources = Path(launch.__file__).parent
    for path in [*(sources / "driver").glob("*.py"), sources / "launch.py", *(sources / "config").glob("*.py")]:
        for flag in re.findall(r"--([a-z][a-z0-9_-]*)", path.read_text()):
            assert flag in DEFAULTS or flag in options or flag.replace("-", "_") in DEFAULTS, (path.name, flag)


def test_a_lock_refusal_names_the_one_thing_that_frees_it(tmp_path):
    from raygpt.driver.runlock import RunLockedError, lock_run

    out, storage = tmp_path / "out", tmp_path / "ray"
    held = lock_run(str(out), str(storage), "out")
    try:
        with pytest.raises(RunLockedError, match="wait for it to end, or pass another --out_dir$"):
            lock_run(str(out), str(storage), "elsewhere")
        with pytest.raises(RunLockedError, match="wait for it to end, or pass another --run_name$"):
            lock_run(str(tmp_path / "other"), str(storage), "out")
        lock_run(str(tmp_path / "other"), str(storage), "out", ray_run=False).release()  # local mode
        lock_run(str(tmp_path / "other"), str(storage), "another").release()
    finally:
        held.release()
