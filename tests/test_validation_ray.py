"""A checkpoint's evals as Ray Train validation tasks, on the session's CPU Ray cluster, through the real CLI:
the results join the right checkpoint in Ray, reach the console, TensorBoard and metrics.jsonl, rank the
kept checkpoints, and training does not wait for them."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import TINY_LOCAL_RUN
from test_tensorboard import board

from raygpt.worker.reporting import METRICS_NAME

REPO = Path(__file__).resolve().parents[1]
# Lines the tiny character model reads: every character is in tiny Shakespeare.
EXAMPLES = [
    {"ctx": "ROMEO: What say you", "endings": ["of love?", "xq zz", "the king", "and then"], "label": 0},
    {"ctx": "JULIET: Good night", "endings": ["good night!", "qqq", "zzz", "my lord"], "label": 3},
    {"ctx": "First Citizen: Before we", "endings": ["proceed", "zq", "bark", "run"], "label": 0},
]


def test_validation_tasks_score_each_checkpoint_while_training_goes_on(ray_local, tmp_path, char_data):
    tasks = tmp_path / "tiny.jsonl"
    tasks.write_text("".join(json.dumps(example) + "\n" for example in EXAMPLES))
    out_dir, storage = tmp_path / "out", tmp_path / "ray"
    argv = [
        *(arg for arg in TINY_LOCAL_RUN if arg != "--local_mode=True"),
        "--log_interval=1",
        f"--evals={tasks},bpb",
        "--eval_examples=200",  # windows of bpb
        "--checkpoint_score=bpb",
        f"--data_dir={char_data}",
        f"--out_dir={out_dir}",
        f"--storage_path={storage}",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_local, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "raygpt.launch", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "evals tiny, bpb: a Ray task of 1 CPU scores each checkpoint while training goes on" in lines

    # metrics.jsonl has each checkpoint's evals once, and the console said them as they arrived.
    records = [json.loads(line) for line in (out_dir / METRICS_NAME).read_text().splitlines()]
    validated = {r["iter"]: r for r in records if "validation_seconds" in r}
    assert sorted(validated) == [2, 4]
    for iter_num, record in validated.items():
        assert set(record) == {"iter", "tiny/acc", "tiny/acc_norm", "bpb", "validation_seconds"}
        assert 4.0 < record["bpb"] < 7.0  # a barely trained model over 65 characters: about log2(65) bits
        line = (f"validation of iter {iter_num}: tiny acc_norm {record['tiny/acc_norm']:.4f}, bpb {record['bpb']:.4f} "
                f"(took {record['validation_seconds']:.1f}s)")  # fmt: skip
        assert line in lines, done.stdout

    # Training did not wait: it ended (its last step, then the last checkpoint's report) while the
    # validation of that checkpoint was still to come; the run's end waits for it and then shows it.
    last_step = max(i for i, line in enumerate(lines) if line.startswith("iter 3: loss "))
    waiting = next(i for i, line in enumerate(lines) if line.startswith("waiting for the validation of iter "))
    assert "4" in lines[waiting].split("iter ", 1)[1].split(", ")
    assert last_step < waiting < lines.index(next(line for line in lines if line.startswith("validation of iter 4:")))

    # TensorBoard has the scalars at the checkpoint's step.
    scalars = board(out_dir)
    for tag in ("tiny/acc", "tiny/acc_norm", "bpb"):
        assert scalars[tag] == [(i, pytest_approx(validated[i][tag])) for i in (2, 4)], tag

    # In Ray, the metrics joined their checkpoint's (iter included), and the kept ones are ranked by bpb.
    import ray.train

    result = ray.train.Result.from_path(str(storage / "out"))
    kept = {metrics["iter"]: metrics for _, metrics in result.best_checkpoints}
    assert sorted(kept) == [2, 4]
    for iter_num, metrics in kept.items():
        assert metrics["bpb"] == pytest_approx(validated[iter_num]["bpb"]) and "val_loss" in metrics
        assert metrics["tiny/acc_norm"] == validated[iter_num]["tiny/acc_norm"]
    # Each task's record in the run folder, which outlives a checkpoint Ray deletes.
    for iter_num, record in validated.items():
        stored = json.loads((storage / "out" / "validations" / f"iter_{iter_num}.json").read_text())
        assert stored["bpb"] == pytest_approx(record["bpb"]) and stored["iter"] == iter_num
    ranked = [metrics["iter"] for _, metrics in result.best_checkpoints]  # Ray's order: worst first
    assert ranked == sorted(kept, key=lambda i: -kept[i]["bpb"])
    best = min(kept, key=lambda i: kept[i]["bpb"])
    assert f"best bpb {kept[best]['bpb']:.4f} at iter {best}: " in done.stdout


def pytest_approx(value):
    import pytest

    return pytest.approx(value, rel=1e-5)
