"""raygpt.tune as a user meets it, through the CLI: each trial's lines whole and tagged, no colour in a file,
the table last, trial folders beside out_dir (not in it), and what a rerun of the command does (resume an
unfinished sweep, show a finished one, refuse other settings, --fresh beside it)."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_RUN
from test_faults import cli_args, wait_for

from raygpt.driver.sweep_console import TaggedLines, tagged_output
from raygpt.driver.sweep_state import find_sweep
from raygpt.errors import EXIT_INTERRUPTED

SWEEP = {**TINY_RUN, "max_iters": 8, "lr_decay_iters": 8, "eval_interval": 4, "log_interval": 1, "num_workers": 1}
SWEEP.pop("learning_rate")  # sampled


def tune_command(tmp_path, char_data, values: dict, *extra: str) -> list[str]:
    paths = {"data_dir": char_data, "out_dir": tmp_path / "out", "storage_path": tmp_path / "ray"}
    return [sys.executable, "-m", "raygpt.tune", *cli_args({**values, **paths}), *extra]


def run_tune(ray_address: str, command: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


TABLE_HEADER = re.compile(r"^trial\s+learning_rate\s+val_loss\s+best_val_loss\s+iter\s+status$")


def test_each_trials_lines_are_whole_tagged_and_before_the_table_and_a_rerun_shows_it(ray_local, tmp_path, char_data):
    command = tune_command(tmp_path, char_data, SWEEP, "--learning_rate=grid:1e-2,3e-3", "--max-concurrent=2")
    done = run_tune(ray_local, command)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "\x1b[" not in out + done.stderr  # no colour in a file
    assert "repeated" not in out and "completed after" not in out and "session_" not in out
    lines = out.splitlines()
    (header,) = [i for i, line in enumerate(lines) if TABLE_HEADER.match(line)]
    trial_ids = [line.split()[0] for line in lines[header + 1 : header + 3]]
    assert len(trial_ids) == 2 and "peak_memory_gib" not in lines[header]  # on CPU, nothing measures it
    for trial_id in trial_ids:
        tag = f"[{trial_id}] "
        # Every iter line of each trial (none folded into another's), before the table, and its own line at
        # the end counts training iterations.
        iters = [int(m[1]) for line in lines[:header] if (m := re.match(re.escape(tag) + r"iter (\d+): loss", line))]
        assert sorted(iters) == list(range(8))
        assert f"{tag}trial finished after 8 training iterations, best val loss" in out
        assert f"{tag}step 8: train loss" in out
        # Its out_dir is in the sweep's folder beside out_dir, named as its Tune folder.
        assert (tmp_path / "out-tune" / trial_id / "ckpt.pt").is_file()
        assert (tmp_path / "ray" / "out-tune" / trial_id).is_dir()
    # Every line of a trial carries its tag: the worker's lines, none of them untagged.
    for line in lines[:header]:
        if re.search(r"iter \d+:|step \d+:|saved checkpoint|tokens per iteration", line):
            assert re.match(r"\[\w+_\d+\] ", line), line
    assert not (tmp_path / "out").exists()  # a launch's out_dir: the sweep keeps out of it
    experiment = tmp_path / "ray" / "out-tune"
    assert lines[0] == f"raygpt.tune: a new sweep 'out-tune' in {experiment}"
    assert lines[-1] == f"sweep folder: {experiment} (TensorBoard: tensorboard --logdir {experiment})"
    assert list(experiment.glob("*/events.out.tfevents.*"))

    # The same command again: the finished sweep's results, without starting Ray.
    again = run_tune(ray_local, command)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == (
        f"raygpt.tune: sweep 'out-tune' in {experiment} has finished; its results follow (--fresh starts a new "
        "sweep beside it)"
    )
    assert again.stdout.splitlines()[1:] == lines[header:] and "Ray" not in again.stdout
    # Another command under the same name is refused, in one line.
    other = run_tune(ray_local, [*command, "--max_iters=9"])
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr
    assert "sweep 'out-tune'" in other.stderr and "(--max_iters 8 then, 9 now)" in other.stderr
    assert "--fresh" in other.stderr


def test_an_interrupted_sweep_says_so_and_its_command_resumes_it(ray_local, tmp_path, char_data):
    """Ctrl-C: Tune saves the sweep's state and stops; the same command then resumes the trial from its
    last checkpoint, and says so first."""
    values = {**SWEEP, "max_iters": 300, "lr_decay_iters": 300, "eval_interval": 20, "log_interval": 20}
    command = tune_command(tmp_path, char_data, values, "--learning_rate=grid:1e-2", "--name=lr")
    env = {**os.environ, "RAY_ADDRESS": ray_local, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        wait_for(process, r"saved checkpoint at iter 20")
        deadline = time.time() + 60
        while not list((tmp_path / "ray" / "lr").glob("*/checkpoint_000000")):  # Tune has registered it
            assert time.time() < deadline, "Tune never stored the trial's checkpoint"
            wait_for(process, r"iter \d+:")
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == EXIT_INTERRUPTED, output[-3000:]
    assert output.splitlines()[-1] == "interrupted: 1 trial of 1 unfinished; the same command resumes the sweep"

    resumed = run_tune(ray_local, command)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    lines = resumed.stdout.splitlines()
    assert lines[0] == f"raygpt.tune: resuming sweep 'lr' in {tmp_path / 'ray' / 'lr'}: 1 of 1 trials unfinished"
    (trial,) = [path for path in (tmp_path / "lr").iterdir() if path.is_dir()]
    assert int(re.search(rf"\[{trial.name}\] resuming from \S+ at iter (\d+)", resumed.stdout)[1]) >= 20
    assert f"[{trial.name}] trial finished after 300 training iterations" in resumed.stdout


def test_tagged_lines_tag_each_line_once():
    """print's separate writes of one line get one tag; a process gets its streams back."""

    class Sink:
        def __init__(self):
            self.text = ""

        def write(self, text):
            self.text += text

    sink = Sink()
    stream = TaggedLines(sink, "[t_00000] ")
    print("iter 1:", "loss 2.0", file=stream)
    stream.write("step 2: a\n\nsaved")
    stream.write(" checkpoint\n")
    assert sink.text == "[t_00000] iter 1: loss 2.0\n[t_00000] step 2: a\n[t_00000]\n[t_00000] saved checkpoint\n"
    before = sys.stdout
    with tagged_output("[x] "):
        assert isinstance(sys.stdout, TaggedLines) and sys.stdout.stream is before
    assert sys.stdout is before


def test_fresh_starts_a_new_sweep_beside_the_taken_names(tmp_path):
    from raygpt.config.schema import TrainConfig

    cfg = TrainConfig(out_dir=str(tmp_path / "out"), storage_path=str(tmp_path / "ray"))
    assert find_sweep(cfg, "s", None, 2, fresh=True).name == "s"  # nothing beside which: its own name
    (tmp_path / "ray" / "s").mkdir(parents=True)  # an experiment folder
    (tmp_path / "s-2").mkdir()  # a trials folder
    sweep = find_sweep(cfg, "s", None, 2, fresh=True)
    assert (sweep.name, sweep.state, sweep.trials_dir) == ("s-3", "new", str(tmp_path / "s-3"))
    assert sweep.line == f"--fresh: a new sweep 's-3' in {tmp_path / 'ray' / 's-3'}; 's' is kept as it was"
    assert Path(sweep.path) == tmp_path / "ray" / "s-3" and not Path(sweep.path).exists()


@pytest.mark.parametrize("fresh", [False, True])
def test_a_new_sweep_says_where_it_goes(tmp_path, fresh):
    from raygpt.config.schema import TrainConfig

    cfg = TrainConfig(out_dir=str(tmp_path / "runs" / "out"), storage_path=str(tmp_path / "ray"))
    sweep = find_sweep(cfg, "out-tune", None, 1, fresh=fresh)
    assert sweep.state == "new" and sweep.trials_dir == str(tmp_path / "runs" / "out-tune")
    assert sweep.line == f"a new sweep 'out-tune' in {tmp_path / 'ray' / 'out-tune'}"


class Result:
    """What summarize reads of one of Tune's Results."""

    def __init__(self, trial_id: str, lr: float, best: float, peak_memory_gib):
        self.config, self.error, self.path, self.metrics_dataframe = {"learning_rate": lr}, None, trial_id, None
        self.metrics = {"trial_id": trial_id, "iter": 8, "val_loss": best, "best_val_loss": best,
                        "peak_memory_gib": peak_memory_gib}  # fmt: skip
        self.best_checkpoints = []


class Grid(list):
    """What summarize reads of Tune's ResultGrid."""

    experiment_path = "/sweeps/s"

    def get_best_result(self, metric, mode, scope):
        return min(self, key=lambda result: result.metrics[metric])


@pytest.mark.parametrize("peak_memory_gib, column", [(None, False), (1.25, True)])
def test_the_peak_memory_column_is_the_gpus_and_left_out_on_cpu(capsys, peak_memory_gib, column):
    from raygpt.driver.sweep_report import summarize

    grid = Grid([Result("a_00001", 1e-3, 2.5, peak_memory_gib), Result("a_00000", 1e-2, 2.0, peak_memory_gib)])
    assert summarize(grid, ["learning_rate"], max_iters=8) == 0
    lines = capsys.readouterr().out.splitlines()
    assert ("peak_memory_gib" in lines[0].split()) is column
    assert [line.split()[0] for line in lines[1:3]] == ["a_00000", "a_00001"]  # in trial order
    if column:
        assert lines[1].split()[-2] == "1.25"
    assert lines[3] == "best trial a_00000: learning_rate=0.01"
