"""raygpt.tune: search-space parsing, one-line refusals, and real Ray Tune sweeps on CPU: one-worker trials
that train in the trial's process (also killed and restarted by Tune), and a 2-worker trial that is a Train run."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_RUN
from test_faults import FAULT_RUN, assert_bit_identical, cli_args, ray_actor_processes, reference_weights, wait_for

from raygpt import tune as rtune
from raygpt.config.schema import ConfigError, TrainConfig
from raygpt.core import checkpoint
from raygpt.driver import sweep_report

TINY = {**TINY_RUN, "min_lr": 1e-6}


def test_search_space_parsing():
    rest, specs = rtune.split_argv(
        [
            "cfg.py",
            "--learning_rate=loguniform:1e-4:3e-3",
            "--batch_size",
            "grid:4,8",
            "--dropout=choice:0.0,0.1",
            "--max_iters=5",
            "--n-layer=uniform:2:6",
            "--dataset",
            "shakespeare_char",
        ]
    )
    assert rest == ["cfg.py", "--max_iters=5", "--dataset", "shakespeare_char"]
    assert specs == {
        "learning_rate": rtune.Spec("loguniform", (1e-4, 3e-3)),
        "batch_size": rtune.Spec("grid", (4, 8)),
        "dropout": rtune.Spec("choice", (0.0, 0.1)),
        "n_layer": rtune.Spec("uniform", (2, 6)),
    }
    space = rtune.search_space(specs)
    assert space["batch_size"] == {"grid_search": [4, 8]}
    assert (space["learning_rate"].lower, space["learning_rate"].upper) == (1e-4, 3e-3)
    assert space["dropout"].categories == [0.0, 0.1]
    # an int key samples ints, both bounds included
    assert {space["n_layer"].sample() for _ in range(200)} == {2, 3, 4, 5, 6}
    assert rtune.trial_count(space, num_samples=3) == 6
    # the API of split_search_space: the param_space directly
    _, direct = rtune.split_search_space(["--learning_rate=grid:1e-3,1e-2"])
    assert direct == {"learning_rate": {"grid_search": [1e-3, 1e-2]}}


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--learning_rate=loguniform:abc", "bad search space for learning_rate: loguniform needs two numbers"),
        ("--learning_rate=loguniform:0:1", "loguniform needs LOW > 0"),
        ("--learning_rate=uniform:3e-3:1e-4", "needs LOW < HIGH"),
        ("--batch_size=grid:", "grid needs comma-separated values"),
        ("--dropout=choice:0.1,,0.2", "choice needs comma-separated values"),
        ("--n_layer=uniform:1.5:4", "bound"),
        ("--dataset=uniform:1:2", "needs a numeric key"),
        ("--out_dir=grid:a,b", "cannot be sampled"),
        ("--learning_rat=uniform:1:2", "did you mean 'learning_rate'"),
    ],
)
def test_bad_spec_is_refused(arg, message):
    with pytest.raises(ConfigError, match=message):
        rtune.split_argv([arg])


def test_bad_spec_is_one_line_exit_2(capsys):
    assert rtune.main(["--learning_rate=loguniform:abc", "--max_iters=5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bad search space for learning_rate") and err.count("\n") == 1
    # values are checked against the base config before anything starts: min_lr above a sampled learning rate
    assert rtune.main(["--learning_rate=grid:1e-5,1e-2", "--min_lr=1e-4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bad search space for learning_rate") and "min_lr" in err and err.count("\n") == 1
    assert rtune.main(["--max_iters=5"]) == 2
    assert capsys.readouterr().err.startswith("error: nothing to tune")


def sweep_base(tmp_path, char_data, run_name: str, **keys) -> TrainConfig:
    """The tiny config a sweep test starts from, its outputs under tmp_path."""
    paths = dict(data_dir=str(char_data), out_dir=str(tmp_path / "out"), storage_path=str(tmp_path / "ray"))
    return TrainConfig(**{**TINY, **paths, "run_name": run_name, **keys})


def test_sweep_picks_the_better_learning_rate_and_asha_stops_the_worse(ray_local, tmp_path, char_data, capsys):
    """One trial after the other in one Tune process: the later two, far worse at the grace period, are
    stopped by ASHA there, and the process goes on to the next trial (a stopped trial's loop must end at
    once: Tune gives it 2 s before it gives up on the process, and the sweep then waited forever)."""
    base = sweep_base(tmp_path, char_data, "sweep", out_dir=str(tmp_path / "out-sweep"), num_workers=1)
    _, specs = rtune.split_argv(["--learning_rate=grid:1e-2,1e-5,1e-6"])
    grid = rtune.run_sweep(base, specs, explicit_keys={"num_workers"}, max_concurrent=1, asha=True,
                           grace_period=10, verbose=0)  # fmt: skip
    assert len(grid) == 3 and not grid.errors
    by_lr = {r.config["learning_rate"]: r for r in grid}
    assert set(by_lr) == {1e-6, 1e-5, 1e-2}
    assert [by_lr[lr].metrics["iter"] for lr in (1e-2, 1e-5, 1e-6)] == [20, 10, 10]
    for result in grid:
        trial_id = result.metrics["trial_id"]
        # each trial has its own out_dir, in the sweep's folder beside out_dir (named as its experiment), and
        # its Tune folder is named by its id; one worker trains in the trial's process: no Train run of its own
        assert os.path.exists(tmp_path / "sweep-tune" / trial_id / "ckpt.pt")
        assert result.path == str(tmp_path / "ray" / "sweep-tune" / trial_id)
        assert not (tmp_path / "ray" / f"sweep-{trial_id}").exists()
        assert result.checkpoint is not None and result.checkpoint.path.startswith(result.path)
    assert grid.experiment_path == str(tmp_path / "ray" / "sweep-tune")
    assert by_lr[1e-2].metrics["best_val_loss"] < by_lr[1e-5].metrics["best_val_loss"]
    assert by_lr[1e-2].metrics["best_val_loss"] < math.log(65) - 0.3
    best = grid.get_best_result(metric="best_val_loss", mode="min")
    assert best.config["learning_rate"] == 1e-2
    ckpt, metrics = sweep_report.best_checkpoint(best)
    assert os.path.exists(os.path.join(ckpt, "ckpt.pt"))
    assert metrics["val_loss"] == best.metrics["best_val_loss"]
    assert not (tmp_path / "out-sweep").exists()  # out_dir is a launch's: the sweep makes nothing there

    capsys.readouterr()
    assert sweep_report.summarize(grid, list(specs), base.max_iters) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["trial", "learning_rate", "val_loss", "best_val_loss", "iter", "status"]
    assert sorted(line.split()[-1] for line in lines[1:4]) == ["DONE", "STOPPED", "STOPPED"]
    assert f"best trial {best.metrics['trial_id']}: learning_rate=0.01" in out
    assert f"best val loss {best.metrics['best_val_loss']:.4f}" in out
    assert f"best checkpoint: {ckpt}" in out
    # Tune ends the process of the last trial, a stopped one, right after setting its stop event: the
    # exit waits for the loop instead of stopping it inside a torch call ("Fatal Python error: Aborted").
    assert_trial_processes_ended_cleanly(grid)


def assert_trial_processes_ended_cleanly(grid, timeout: float = 60) -> None:
    import psutil
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    for pid in {result.metrics["pid"] for result in grid}:
        deadline = time.time() + timeout
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.time() < deadline, f"trial process {pid} still running"
            time.sleep(0.2)
        errors = "".join(path.read_text(errors="replace") for path in logs.glob(f"worker-*-{pid}.err"))
        assert "Fatal Python error" not in errors, errors[-3000:]


def test_multi_worker_trials_are_train_runs_and_asha_stops_them(ray_local, tmp_path, char_data, capsys):
    """A trial of 2 workers is a Train run of its own; one that ASHA stops ends, and the next trial starts
    (with its process reused, the stopped Train run went on and the sweep waited forever)."""
    base = sweep_base(tmp_path, char_data, "wide", num_workers=2, cpus_per_worker=1)
    _, specs = rtune.split_argv(["--learning_rate=grid:1e-2,1e-6"])
    keys = {"num_workers", "cpus_per_worker"}
    try:
        grid = rtune.run_sweep(base, specs, keys, max_concurrent=1, asha=True, grace_period=10, verbose=0)
    finally:
        remove_leftover_placement_groups()
    assert "each a Ray Train run" in capsys.readouterr().out
    assert len(grid) == 2 and not grid.errors
    by_lr = {r.config["learning_rate"]: r for r in grid}
    assert by_lr[1e-2].metrics["iter"] == 20 and by_lr[1e-6].metrics["iter"] == 10
    result = by_lr[1e-2]
    trial_id = result.metrics["trial_id"]
    assert (tmp_path / "ray" / f"wide-{trial_id}").is_dir()  # the Train run's own folder in storage
    # The Train workers' lines carry the trial's id, as a one-worker trial's do.
    assert f"[{trial_id}] iter 19: loss" in ray_worker_output()
    ckpt, metrics = sweep_report.best_checkpoint(result)
    assert ckpt.startswith(str(tmp_path / "ray" / f"wide-{trial_id}"))
    assert metrics["val_loss"] == result.metrics["best_val_loss"]


def ray_worker_output() -> str:
    """What the shared cluster's worker processes printed (Ray's log files of this session)."""
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    return "".join(path.read_text(errors="replace") for path in logs.glob("worker-*.out"))


def remove_leftover_placement_groups() -> None:
    """Tune ends each trial by killing its process, and with it the trial's Train controller. Ray Train's
    placement group cleaner then removes the run's group, but it asks Ray's State API, which needs the
    dashboard this test cluster does not start: the groups would hold the cluster's CPUs until the
    session ends (a real sweep's Ray has its dashboard)."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    for group_id, info in placement_group_table().items():
        if info["state"] == "CREATED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))


def test_killed_trial_is_restarted_by_tune_and_ends_bit_identical(ray_local, tmp_path, char_data):
    """A one-worker trial trains in Tune's trial process: SIGKILL it after its first checkpoint, and Tune
    restarts the trial from that checkpoint; the weights end as those of an uninterrupted Train run."""
    run = {**FAULT_RUN, "num_workers": 1, "max_failures": 1, "max_iters": 150, "lr_decay_iters": 150}
    # Uninterrupted, in this process (local mode: the same loop, without a worker group to start).
    reference = reference_weights(tmp_path, char_data, **run, local_mode=True)
    values = {**run, "data_dir": char_data, "out_dir": tmp_path / "out-sweep", "storage_path": tmp_path / "ray"}
    values.pop("learning_rate")  # swept below, at the same value: a key both set and swept is refused
    started = time.time()
    process = subprocess.Popen(
        [sys.executable, "-m", "raygpt.tune", *cli_args(values), f"--learning_rate=grid:{run['learning_rate']}"],
        env={**os.environ, "RAY_ADDRESS": ray_local, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(process, "each training in its Tune trial's process")
        wait_for(process, r"saved checkpoint at iter 50")
        deadline = time.time() + 60
        while not list((tmp_path / "ray").glob("*-tune/*/checkpoint_000000")):  # Tune has registered it
            assert time.time() < deadline, "Tune never stored the trial's checkpoint"
            wait_for(process, r"iter \d+:")
        wait_for(process, r"iter 6\d:")
        (trial_process,) = ray_actor_processes("ImplicitFunc", started)
        os.kill(trial_process.pid, signal.SIGKILL)
        resumed = wait_for(process, r"resuming from \S+ at iter (\d+)")
        assert int(resumed[1]) >= 50
        output, _ = process.communicate(timeout=240)
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]
    (trial_checkpoint,) = (tmp_path / "out-sweep-tune").glob("*/ckpt.pt")
    assert_bit_identical(checkpoint.load(trial_checkpoint), reference, max_iters=run["max_iters"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seed=grid:1,2", "--seed=3"], "--seed is both sampled (grid:1,2) and set: give it once"),
        (["--learning_rate", "loguniform:1e-4:1e-3", "--learning-rate", "1e-3"], "--learning_rate is both sampled"),
        (
            ["--n_head=grid:2,3", "--n_embd=16"],
            "bad search space for n_head (grid:2,3): n_embd (16) must be divisible by n_head (3)",
        ),
        (["--lr_g=grid:1,2"], "unknown config key"),
        (
            ["--learning_rate=grid:1e-3,1e-2", "--asha", "--grace-period", "100"],
            "--grace-period must be from 1 to max_iters (20)",
        ),
        (
            ["--learning_rate=grid:1e-3,1e-2", "--asha", "--grace-period", "0"],
            "--grace-period must be from 1 to max_iters",
        ),
        (["--learning_rate=grid:1e-3,1e-2", "--grace-period", "5"], "--grace-period is ASHA's: add --asha"),
        (["--learning_rate=grid:1e-3,1e-2", "--num-samples", "-4"], "--num-samples must be at least 1, got -4"),
        (["--learning_rate=grid:1e-3,1e-2", "--num-samples", "x"], "argument --num-samples: invalid int value: 'x'"),
        (["--learning_rate=grid:1e-3,1e-2", "--max-concurrent", "0"], "--max-concurrent must be at least 1, got 0"),
        (["--learning_rate=grid:1e-3,1e-2", "--name=a/b"], "--name 'a/b' must be a plain folder name"),
        (["--learning_rate=grid:1e-3,1e-2", "--name="], "--name '' must be a plain folder name"),
        (["--learning_rate=grid:1e-3,1e-2", "--name=" + "n" * 256], "--name: the name 'nnnn"),
        (["--learning_rate=grid:1e-3,1e-2", "--run_name=" + "é" * 128], "run_name: the name 'éééé"),
        (["--learning_rate=grid:1e-3,1e-2", "--storage_path=ftp://host/runs"], "cannot open ftp://host/runs"),
        (["--learning_rate=grid:1e-3,1e-2", "--storage_path=s3://"], "s3:// names no bucket"),
        (["--learning_rate=grid:1e-3,1e-2", "--storage_path=s3:/bucket/runs"], "looks like a URI with a slash missing"),
        (["--learning_rate=grid:1e-3,1e-2", "--storage_path={tmp}/afile"], "{tmp}/afile is a file, not a folder"),
        (
            ["--gradient_accumulation_steps=grid:2,3", "--num_workers=2"],
            "bad search space for gradient_accumulation_steps (grid:2,3): gradient_accumulation_steps (3) must "
            "be divisible by the number of workers (2): sample multiples of 2, e.g. "
            "--gradient_accumulation_steps=grid:2,4",
        ),
        (["--gradient_accumulation_steps=uniform:2:5", "--num_workers=2"], "--gradient_accumulation_steps=choice:2,4"),
        (["--gradient_accumulation_steps=loguniform:3:5", "--num_workers=4"], "(3) must be divisible by the number"),
        (["--data_order=choice:seeded,nanogpt", "--num_workers=2"], "needs num_workers=1, not 2"),
    ],
)
def test_sweeps_that_cannot_run_are_one_line_before_ray_starts(tmp_path, capsys, monkeypatch, argv, message):
    def ray_would_start(*args, **kwargs):
        raise AssertionError("reached prepare_run: the refusal came too late")

    monkeypatch.setattr(rtune, "prepare_run", ray_would_start)
    (tmp_path / "afile").write_text("not a folder")
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    assert (
        rtune.main([*argv, "--max_iters=20", "--device=cpu", f"--out_dir={tmp_path / 'out'}", *storage(tmp_path, argv)])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message.format(tmp=tmp_path) in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--gradient_accumulation_steps=grid:2,4", "--num_workers=2"],  # the advice above, as printed
        ["--gradient_accumulation_steps=choice:2,4", "--num_workers=2"],
        ["--gradient_accumulation_steps=uniform:1:5", "--num_workers=1"],
    ],
)
def test_sampled_accumulation_the_workers_divide_is_accepted(tmp_path, monkeypatch, argv):
    def reached(*args, **kwargs):
        raise RuntimeError("reached prepare_run")

    monkeypatch.setattr(rtune, "prepare_run", reached)
    with pytest.raises(RuntimeError, match="reached prepare_run"):
        rtune.main([*argv, "--max_iters=20", "--device=cpu", f"--out_dir={tmp_path / 'out'}", *storage(tmp_path, argv)])


def storage(tmp_path, argv) -> list[str]:
    """A storage_path of the test's own where argv gives none (a sweep looks for its earlier self there)."""
    return [] if any(arg.startswith("--storage_path") for arg in argv) else [f"--storage_path={tmp_path / 'ray'}"]


def test_the_planned_worker_count_is_checked_against_every_sampled_value():
    """Where the count is planned from the cluster (one a GPU), and for a ready param_space."""
    from ray import tune

    base = TrainConfig(gradient_accumulation_steps=4)
    for space in (
        {"gradient_accumulation_steps": tune.grid_search([4, 6])},
        rtune.split_argv(["--gradient_accumulation_steps=choice:4,6"])[1],
    ):
        rtune.check_sampled_for_workers(base, space, 2)
        with pytest.raises(
            ConfigError, match=r"\(6\) must be divisible by the number of workers \(4\).*=(grid|choice):4,8"
        ):
            rtune.check_sampled_for_workers(base, space, 4)


def test_a_run_name_too_long_for_its_trials_is_refused():
    """Each trial's Ray run is <run_name>-<trial id>: the run name must leave room for the trial id."""
    rtune.check_trial_names("r" * 243)
    with pytest.raises(ConfigError) as error:
        rtune.check_trial_names("r" * 244)
    assert "its trials' Ray runs, <run_name>-abcde_00000, would be 256 bytes" in str(error.value)


def test_the_base_holds_each_sampled_key_at_its_first_value():
    _, specs = rtune.split_argv(["--n_head=grid:2,4", "--learning_rate=loguniform:1e-4:1e-3"])
    base, explicit = rtune.read_base(["--n_embd=16"], specs)
    assert (base.n_head, base.learning_rate, base.n_embd) == (2, 1e-4, 16) and {"n_head", "n_embd"} <= explicit


@pytest.mark.parametrize(
    "evals, score, order", [("", "val_loss", "min"), ("bpb", "bpb", "min"), ("hellaswag", "hellaswag/acc_norm", "max")]
)
def test_a_trial_that_trains_itself_keeps_checkpoints_by_checkpoint_score(evals, score, order):
    """One-worker trials score their evals in the loop into the checkpoint's report, so Tune, which keeps
    their checkpoints, ranks them by checkpoint_score as Train would (not always by val_loss)."""
    from raygpt.driver.sweep_trials import trial_run_options

    cfg = TrainConfig(**{**TINY, "checkpoints_to_keep": 2, "evals": evals, "checkpoint_score": score})
    kept = trial_run_options(cfg)["checkpoint_config"]
    assert (kept.num_to_keep, kept.checkpoint_score_attribute, kept.checkpoint_score_order) == (2, score, order)


@pytest.mark.parametrize(
    "evals, workers, fit, cpus_each",
    [
        ("", 2, 4, 2.0),  # 8 CPUs, 2 trials of 2 workers: 2 CPUs a worker
        ("bpb", 2, 2, 1.0),  # each trial's 2-CPU eval task first: 4 CPUs left for 4 workers
        ("bpb", 1, 8, 4.0),  # one-worker trials score in the loop: no task to leave room for
    ],
)
def test_sweep_planning_leaves_each_train_run_trial_room_for_its_eval_task(monkeypatch, evals, workers, fit, cpus_each):
    """A trial that is a Ray Train run scores its checkpoints in a Ray task beside its workers; trials
    planned side by side without that room would hold every CPU, and the tasks would wait for them."""
    import ray

    from raygpt.driver.plan import RunPlan

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(rtune, "plan_resources", lambda cfg: cfg)  # the plan's inputs, without a cluster
    cfg = TrainConfig(**{**TINY, "evals": evals, "eval_cpus": 2, "num_workers": workers})
    plan = RunPlan(num_workers=workers, use_gpu=False, cpus_per_worker=1.0, run_name="sweep")
    assert rtune.trials_that_fit(cfg, plan, {"num_workers"}) == fit
    assert rtune.plan_concurrency(cfg, plan, {"num_workers"}, 2).cpus_per_worker == cpus_each
