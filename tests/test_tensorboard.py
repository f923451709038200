"""TensorBoard in out_dir/tensorboard and the gradient norm on the log line: a run through the real CLI in
local mode, read back with TensorBoard's own reader, and the log step's one host transfer.

A resumed run continues the curves without a step twice, whatever was written past its checkpoint.
"""

import json
import re
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_LOCAL_RUN
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from raygpt import launch
from raygpt.config.schema import TrainConfig
from raygpt.core.step import NonFiniteGuard
from raygpt.worker.loop import log_step
from raygpt.worker.reporting import METRICS_NAME, Reporter, Say
from raygpt.worker.tensorboard import TENSORBOARD_DIR

STEP_TAGS = {"train/loss", "lr", "tokens/s", "grad_norm", "clipped", "nonfinite_skips"}  # mfu: n/a on a CPU
EVAL_TAGS = {"val/loss", "eval/train_loss"}  # peak_memory_gib: GPU only


def board(out_dir) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows of a run: tag -> [(step, value)], read as `tensorboard --logdir` reads it."""
    accumulator = EventAccumulator(str(out_dir / TENSORBOARD_DIR))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def steps(points) -> list[int]:
    return [step for step, _ in points]


def logged_grad_norms(out: str) -> dict[int, tuple[float, bool]]:
    """The console's log lines: iter -> (grad norm, whether it says clipped)."""
    found = re.findall(r"^iter (\d+): loss .*, grad norm (\S+)( \(clipped\))?, eta ", out, re.MULTILINE)
    return {int(i): (float(norm), bool(clipped)) for i, norm, clipped in found}


def test_a_run_writes_tensorboard_and_a_resumed_run_continues_it_without_duplicate_steps(tmp_path, char_data, capsys):
    out_dir = tmp_path / "out"
    argv = [*TINY_LOCAL_RUN, "--log_interval=1", "--grad_clip=0.9", f"--data_dir={char_data}", f"--out_dir={out_dir}"]
    assert launch.main(argv) == 0
    first = board(out_dir)
    assert set(first) == STEP_TAGS | EVAL_TAGS
    assert all(steps(first[tag]) == [0, 1, 2, 3] for tag in STEP_TAGS)
    assert steps(first["val/loss"]) == steps(first["eval/train_loss"]) == [0, 2, 4]
    assert first["nonfinite_skips"] == [(i, 0.0) for i in range(4)]
    # The console's grad norm is TensorBoard's, and "clipped" is where it was over grad_clip.
    printed = logged_grad_norms(capsys.readouterr().out)
    assert sorted(printed) == [0, 1, 2, 3]
    for (i, norm), (_, clipped) in zip(first["grad_norm"], first["clipped"]):
        assert printed[i] == (pytest.approx(norm, abs=1e-4), norm > 0.9) and clipped == float(norm > 0.9)

    # What the run would have left had it been killed after its checkpoint at 4: points past it, here in a
    # file of their own that TensorBoard reads after the run's (written with tensorboardX's own writer).
    from tensorboardX import SummaryWriter

    killed = SummaryWriter(str(out_dir / TENSORBOARD_DIR), filename_suffix=f".{time.time_ns()}")
    for step, tag in [(4, "train/loss"), (4, "grad_norm"), (5, "train/loss"), (6, "val/loss")]:
        killed.add_scalar(tag, 99.0, step)
    killed.close()
    assert (6, 99.0) in board(out_dir)["val/loss"]

    assert launch.main([*argv, "--max_iters=6"]) == 0  # resumes from the checkpoint at 4
    resumed = board(out_dir)
    assert set(resumed) == STEP_TAGS | EVAL_TAGS
    assert all(steps(resumed[tag]) == [0, 1, 2, 3, 4, 5] for tag in STEP_TAGS)
    assert steps(resumed["val/loss"]) == steps(resumed["eval/train_loss"]) == [0, 2, 4, 6]
    assert all(value != 99.0 for points in resumed.values() for _, value in points)
    # The first run's points stay, its eval at 4 included (the resumed run does not repeat it).
    assert all(resumed[tag][:4] == first[tag] for tag in STEP_TAGS)
    assert resumed["val/loss"][:3] == first["val/loss"] and resumed["eval/train_loss"][:3] == first["eval/train_loss"]
    # The new points are the resumed run's, as its metrics.jsonl lines have them.
    records = [json.loads(line) for line in (out_dir / METRICS_NAME).read_text().splitlines()]
    new_steps = [r for r in records if "loss" in r and r["iter"] >= 4]
    assert resumed["train/loss"][4:] == [(r["iter"], pytest.approx(r["loss"])) for r in new_steps]
    assert resumed["grad_norm"][4:] == [(r["iter"], pytest.approx(r["grad_norm"])) for r in new_steps]
    assert logged_grad_norms(capsys.readouterr().out).keys() == {4, 5}


def reporter(out_dir, **config) -> Reporter:
    """Rank 0's Reporter of a new run in out_dir, on a CPU whose MFU would be 25%."""
    out_dir.mkdir(exist_ok=True)
    cfg = TrainConfig(out_dir=str(out_dir), grad_clip=1.0, max_iters=100, eval_interval=50, **config)
    return Reporter(cfg, Say(True), tokens_per_iter=64, estimate_mfu=lambda dt: 0.25, device=torch.device("cpu"),
                    start_iter=0)  # fmt: skip


def record_host_reads(monkeypatch) -> list[str]:
    """Every read of a tensor's values into Python (on a GPU, a wait for it), by the method's name."""
    reads = []

    def recorded(name, method):
        def read(self, *args, **kwargs):
            reads.append(name)
            return method(self, *args, **kwargs)

        return read

    for name in ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, recorded(name, getattr(torch.Tensor, name)))
    return reads


def test_the_log_step_reads_loss_grad_norm_and_the_guards_counts_in_one_host_transfer(tmp_path, monkeypatch, capsys):
    guard = NonFiniteGuard(max_in_a_row=3, device=torch.device("cpu"))
    weight = torch.nn.Parameter(torch.ones(2))
    weight.grad = torch.full((2,), float("nan"))
    guard.step(torch.optim.AdamW([weight]), torch.amp.GradScaler("cpu", enabled=False), torch.tensor(float("nan")))
    run = SimpleNamespace(state=SimpleNamespace(iter_num=8, last_eval={"val": 2.5}), guard=guard,
                          reporter=reporter(tmp_path))  # fmt: skip
    reads = record_host_reads(monkeypatch)
    log_step(run, torch.tensor(3.25), torch.tensor(2.5), lr=1e-3, dt=0.01)
    monkeypatch.undo()
    assert reads == ["tolist"]
    out = capsys.readouterr().out
    assert "warning: iter 7: 1 step(s) skipped" in out and guard.skipped == 1
    assert "iter 7: loss 3.2500, " in out and ", grad norm 2.5000 (clipped), eta " in out
    run.reporter.finish()
    points = board(tmp_path)
    assert (
        points["grad_norm"] == [(7, 2.5)]
        and points["clipped"] == [(7, 1.0)]
        and points["nonfinite_skips"] == [(7, 1.0)]
    )


def test_mfu_once_known_and_no_tensorboard_when_turned_off(tmp_path, capsys):
    on = reporter(tmp_path / "on")
    for i in range(6):  # MFU counts from the fifth step of a process (WARMUP_STEPS)
        on.step(i, loss=3.0, grad_norm=0.5, lr=1e-3, dt=0.01, last_val_loss=3.1, nonfinite_skips=0)
    on.finish()
    assert steps(board(tmp_path / "on")["mfu"]) == [4, 5] and "grad norm 0.5000, eta" in capsys.readouterr().out

    off = reporter(tmp_path / "off", tensorboard=False)
    off.step(0, loss=3.0, grad_norm=0.5, lr=1e-3, dt=0.01, last_val_loss=3.1, nonfinite_skips=0)
    off.finish()
    assert (tmp_path / "off" / METRICS_NAME).exists() and not (tmp_path / "off" / TENSORBOARD_DIR).exists()
