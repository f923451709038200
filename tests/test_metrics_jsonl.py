"""out_dir/metrics.jsonl: the loss history a run keeps without WandB, through the real CLI in local mode.

A rerun continues it without repeating an iteration, whatever the process before it wrote past its
checkpoint (a killed run's steps, and the half line of a write it was killed in).
"""

import json

from conftest import TINY_LOCAL_RUN

from raygpt import launch
from raygpt.core import checkpoint
from raygpt.worker.reporting import METRICS_NAME, metrics_lines

STEP_KEYS = {"iter", "loss", "lr", "time_ms", "tokens_per_sec", "mfu", "grad_norm"}
EVAL_KEYS = {"iter", "train_loss", "val_loss"}


def history(out_dir) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl's step records and eval records, in file order; every line of it must be whole JSON."""
    text = (out_dir / METRICS_NAME).read_text()
    assert text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()]
    assert metrics_lines(text) == records
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def test_a_run_writes_its_loss_history_and_a_rerun_continues_it_without_repeats(tmp_path, char_data):
    out_dir = tmp_path / "out"
    argv = [*TINY_LOCAL_RUN, "--log_interval=1", f"--data_dir={char_data}", f"--out_dir={out_dir}"]
    assert launch.main(argv) == 0
    steps, evals = history(out_dir)
    assert [r["iter"] for r in steps] == [0, 1, 2, 3] and all(set(r) == STEP_KEYS for r in steps)
    assert [r["iter"] for r in evals] == [0, 2, 4] and all(set(r) == EVAL_KEYS for r in evals)
    assert all(r["loss"] > 0 and r["time_ms"] > 0 and r["tokens_per_sec"] > 0 for r in steps)
    assert all(r["val_loss"] > 0 and r["train_loss"] > 0 for r in evals)
    assert checkpoint.load(out_dir / "ckpt.pt")["iter_num"] == 4
    # What a run killed after its checkpoint at iter 4 leaves: steps past it, and a line cut short.
    with open(out_dir / METRICS_NAME, "a") as file:
        file.write('{"iter": 4, "loss": 99.0}\n{"iter": 5, "loss": 99.0}\n{"iter": 6, "lo')

    assert launch.main([*argv, "--max_iters=6"]) == 0
    steps_after, evals_after = history(out_dir)
    assert [r["iter"] for r in steps_after] == [0, 1, 2, 3, 4, 5]
    assert steps_after[:4] == steps and all(r["loss"] != 99.0 for r in steps_after)
    assert [r["iter"] for r in evals_after] == [0, 2, 4, 6]  # the resumed run does not repeat the eval at 4
    assert evals_after[:3] == evals
