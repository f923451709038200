"""A checkpoint's evals where Ray runs no validation tasks (local mode: in the loop, through the real CLI),
the evals' config and the launcher's checks of their data, and the resources a Ray run leaves them.
The Ray Train path is tests/test_validation_ray.py."""

import json

import pytest
import torch
from conftest import TINY_LOCAL_RUN
from test_tensorboard import board

from raygpt import launch
from raygpt.config.cli import read_config
from raygpt.config.schema import TrainConfig
from raygpt.core import checkpoint
from raygpt.core.model import GPT, GPTConfig
from raygpt.errors import LaunchError
from raygpt.worker.reporting import METRICS_NAME

# Lines a character model of tiny Shakespeare reads: every character is in its vocabulary.
EXAMPLES = [
    {"ctx": "ROMEO: What say you", "endings": ["of love?", "xq zz", "the king", "and then"], "label": 0},
    {"ctx": "JULIET: Good night", "endings": ["good night!", "qqq", "zzz", "my lord"], "label": 3},
]


def write_jsonl(path, examples):
    path.write_text("".join(json.dumps(example) + "\n" for example in examples))
    return path


def validations(out_dir) -> dict[int, dict]:
    records = [json.loads(line) for line in (out_dir / METRICS_NAME).read_text().splitlines()]
    found = [r for r in records if "validation_seconds" in r]
    assert len({r["iter"] for r in found}) == len(found), found  # each checkpoint's evals once
    return {r["iter"]: r for r in found}


def test_local_mode_scores_each_checkpoint_in_the_loop_and_a_rerun_continues(tmp_path, char_data, capsys):
    tasks = write_jsonl(tmp_path / "tiny.jsonl", EXAMPLES)
    out_dir = tmp_path / "out"
    argv = [*TINY_LOCAL_RUN, f"--data_dir={char_data}", f"--out_dir={out_dir}", f"--evals={tasks},bpb",
            "--eval_examples=50", "--checkpoint_score=tiny/acc_norm"]  # fmt: skip
    assert launch.main(argv) == 0
    out = capsys.readouterr().out
    assert "evals tiny, bpb run in the loop at each checkpoint (local mode has no Ray tasks): training waits " in out
    first = validations(out_dir)
    assert sorted(first) == [2, 4]
    for iter_num, record in first.items():
        assert set(record) == {"iter", "tiny/acc", "tiny/acc_norm", "bpb", "validation_seconds"}
        assert record["tiny/acc_norm"] in (0.0, 0.5, 1.0) and 5.0 < record["bpb"] < 7.0  # about log2(65) bits
        assert (f"validation of iter {iter_num}: tiny acc_norm {record['tiny/acc_norm']:.4f}, bpb "
                f"{record['bpb']:.4f} (took {record['validation_seconds']:.1f}s)\n") in out  # fmt: skip
    # Shown before its checkpoint is handed over, whose reported metrics it joins.
    assert out.index("validation of iter 4:") < out.index("saved checkpoint at iter 4")
    assert [step for step, _ in board(out_dir)["bpb"]] == [2, 4]

    result = launch.run(*read_config([*argv, "--max_iters=6"]))  # resumes from the checkpoint at 4
    out = capsys.readouterr().out
    assert "validation of iter 4:" not in out and "validation of iter 6:" in out
    after = validations(out_dir)
    assert sorted(after) == [2, 4, 6] and all(after[i] == first[i] for i in (2, 4))
    # The evals joined the metrics reported with the checkpoint.
    assert result.metrics["iter"] == 6 and "val_loss" in result.metrics
    assert {k: result.metrics[k] for k in ("tiny/acc", "tiny/acc_norm", "bpb")} == {
        k: pytest.approx(after[6][k]) for k in ("tiny/acc", "tiny/acc_norm", "bpb")}  # fmt: skip
    points = board(out_dir)
    assert [step for step, _ in points["bpb"]] == [2, 4, 6]
    assert points["tiny/acc_norm"][:2] == [(i, pytest.approx(first[i]["tiny/acc_norm"])) for i in (2, 4)]
    assert checkpoint.load(out_dir / "ckpt.pt")["iter_num"] == 6


def test_hellaswag_is_read_from_the_cache_the_launcher_fetches_it_to(tmp_path, char_data, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~/.cache/raygpt/evals/hellaswag_val.jsonl: as fetched
    (tmp_path / "home/.cache/raygpt/evals").mkdir(parents=True)
    write_jsonl(tmp_path / "home/.cache/raygpt/evals/hellaswag_val.jsonl", EXAMPLES)
    argv = [*TINY_LOCAL_RUN, "--max_iters=2", f"--data_dir={char_data}", f"--out_dir={tmp_path / 'out'}",
            "--evals=hellaswag"]  # fmt: skip
    assert launch.main(argv) == 0
    out = capsys.readouterr().out
    assert "downloading" not in out and "validation of iter 2: hellaswag acc_norm " in out
    assert set(validations(tmp_path / "out")[2]) == {
        "iter",
        "hellaswag/acc",
        "hellaswag/acc_norm",
        "validation_seconds",
    }


@pytest.mark.parametrize(
    "option, message",
    [
        ("--evals=hellaswg", "evals: unknown eval 'hellaswg' (did you mean 'hellaswag'?): give hellaswag, bpb or"),
        ("--evals=s3://bucket/task.jsonl", "evals: s3://bucket/task.jsonl is a URI; give a local copy"),
        ("--evals=a/task.jsonl,b/task.jsonl", "evals names 'task' twice"),
        ("--eval_examples=-1", "eval_examples must not be negative, got -1"),
        ("--eval_gpus=-0.5", "eval_gpus must not be negative, got -0.5"),
        (
            "--checkpoint_score=hellaswag/acc_norm",
            "checkpoint_score must be a metric of the run's checkpoints "
            "(val_loss), got 'hellaswag/acc_norm': set evals to rank by an eval's",
        ),  # fmt: skip
        ("--checkpoint_score=bpb --evals=hellaswag", "(val_loss, hellaswag/acc, hellaswag/acc_norm), got 'bpb'"),
        ("--eval_only=True --evals=bpb", "evals score each checkpoint, and eval_only saves none"),
    ],
)
def test_bad_eval_config_is_one_line(tmp_path, capsys, option, message):
    assert launch.main([*TINY_LOCAL_RUN, f"--out_dir={tmp_path / 'out'}", *option.split()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


@pytest.mark.parametrize(
    "examples, message",
    [
        (None, "evals: no file "),
        ([{**EXAMPLES[0], "label": 4}], "tiny.jsonl:1: label 4 is out of range: the example has 4 endings"),
        # a character model reads only its dataset's characters
        (
            [{**EXAMPLES[0], "ctx": "ROMEO: 42 {ways}"}],
            "evals tiny: TASKS:1: ctx has characters not in the vocabulary: '24{}': a character-level model",
        ),
    ],
)
def test_eval_data_is_checked_before_the_run_starts(tmp_path, char_data, capsys, examples, message):
    tasks = tmp_path / "tiny.jsonl"
    if examples is not None:
        write_jsonl(tasks, examples)
    argv = [*TINY_LOCAL_RUN, f"--data_dir={char_data}", f"--out_dir={tmp_path / 'out'}", f"--evals={tasks}"]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message.replace("TASKS", str(tasks)) in err, err
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def cluster(monkeypatch, cpus: float, gpus: int = 0) -> None:
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": cpus, "GPU": gpus})


def test_the_workers_leave_the_evals_task_its_resources(monkeypatch):
    from raygpt.driver.plan import plan_resources

    cluster(monkeypatch, 4.0)
    assert plan_resources(TrainConfig(device="cpu")).cpus_per_worker == 4.0
    assert plan_resources(TrainConfig(device="cpu", evals="bpb")).cpus_per_worker == 3.0
    local = TrainConfig(device="cpu", evals="bpb", local_mode=True)  # no Ray task: the loop scores
    assert plan_resources(local).cpus_per_worker == plan_resources(local.replace(evals="")).cpus_per_worker
    cluster(monkeypatch, 64.0, gpus=8)
    assert plan_resources(TrainConfig(evals="bpb", eval_gpus=1, gradient_accumulation_steps=7)).num_workers == 7
    with pytest.raises(LaunchError, match=r"the evals' Ray task needs 1 CPU and 1 GPU beside the workers, but the "
                       r"cluster has 64 CPUs and 8 GPUs and the workers take 32 CPUs and 8 GPUs"):  # fmt: skip
        plan_resources(TrainConfig(evals="bpb", eval_gpus=1, num_workers=8))
    cluster(monkeypatch, 2.0)
    with pytest.raises(LaunchError, match="needs 1 CPU and 0 GPUs beside the workers.*lower --eval_cpus"):
        plan_resources(TrainConfig(device="cpu", evals="bpb", cpus_per_worker=2))


def reported(iter_num: int, status: str, **metrics):
    """What ray.train.get_all_reported_checkpoints returns for a checkpoint."""
    from ray.train import ReportedCheckpoint, ReportedCheckpointStatus

    return ReportedCheckpoint(None, {"iter": iter_num, "val_loss": 1.5, **metrics}, ReportedCheckpointStatus[status])


def test_rank_zero_shows_each_validation_once_as_ray_reports_them(monkeypatch, tmp_path):
    import ray.train

    from raygpt.worker import validation
    from raygpt.worker.session import OrderedRayCalls

    answers = [
        [reported(2, "VALIDATED", bpb=3.1), reported(4, "VALIDATED", bpb=3.0), reported(6, "PENDING_VALIDATION"),
         reported(8, "PENDING_VALIDATION")],
        [reported(2, "VALIDATED", bpb=3.1), reported(4, "VALIDATED", bpb=3.0), reported(6, "VALIDATION_FAILED"),
         reported(8, "PENDING_VALIDATION")],
        [reported(4, "VALIDATED", bpb=3.0), reported(6, "VALIDATION_FAILED"), reported(8, "VALIDATED", bpb=2.9)],
    ]  # fmt: skip
    asked = []

    def get_all_reported_checkpoints(consistency_mode):
        asked.append(consistency_mode.name)
        return answers[min(len(asked), len(answers)) - 1]

    monkeypatch.setattr(ray.train, "get_all_reported_checkpoints", get_all_reported_checkpoints)
    monkeypatch.setattr(validation, "END_WAIT_POLL_S", 0.0)
    shown, said = [], []
    watch = validation.RayValidations(OrderedRayCalls(background=False), shown.append, said.append, shown={2},
                                      results=str(tmp_path / "validations"))  # fmt: skip
    watch.at_eval()  # 2 was shown by an earlier process of the run (its metrics.jsonl)
    assert [m["iter"] for m in shown] == [4] and shown[0]["bpb"] == 3.0
    assert said == ["warning: validations fall behind training (2 checkpoints wait; Ray runs one at a time): give "
                    "them more resources (eval_gpus, eval_cpus) or fewer examples (eval_examples); the run's end "
                    "waits for them"]  # fmt: skip
    watch.finish()
    assert [m["iter"] for m in shown] == [4, 8]
    assert said[1:] == [
        "warning: the validation of iter 6 failed (Ray logs why); its checkpoint keeps its training metrics",
        "waiting for the validation of iter 8",
    ]
    assert set(asked) == {"COMMITTED"}  # never waits for validations inside Ray: the loop's thread goes on


def test_a_validation_whose_checkpoint_ray_deleted_is_shown_from_the_tasks_record(monkeypatch, tmp_path):
    """Ray deletes a validated checkpoint that ranks below checkpoints_to_keep at once, metrics and all (a
    short run whose validations fall behind lost the first ones so); the task's record in the run folder
    still shows it. A record that comes before Ray's status is shown, not waited for."""
    import ray.train

    from raygpt.worker import validation
    from raygpt.worker.session import OrderedRayCalls

    results = tmp_path / "ray" / "run" / "validations"
    answers = [[reported(6, "PENDING_VALIDATION"), reported(8, "PENDING_VALIDATION")],
               [reported(8, "PENDING_VALIDATION")],
               [reported(8, "VALIDATED", bpb=2.9)]]  # fmt: skip
    asked = []

    def get_all_reported_checkpoints(consistency_mode):
        asked.append(consistency_mode)
        if len(asked) == 2:  # 4 and 6 validated since, and 4 deleted by Ray; 8's task has written, not returned
            for iter_num, bpb in ((4, 3.0), (6, 2.95), (8, 2.9)):
                write_result(iter_num, bpb)
        return answers[min(len(asked), len(answers)) - 1]

    def write_result(iter_num, bpb):
        results.mkdir(parents=True, exist_ok=True)
        (results / f"iter_{iter_num}.json").write_text(json.dumps({"iter": iter_num, "bpb": bpb,
                                                                   "validation_seconds": 1.0}))  # fmt: skip

    monkeypatch.setattr(ray.train, "get_all_reported_checkpoints", get_all_reported_checkpoints)
    monkeypatch.setattr(validation, "END_WAIT_POLL_S", 0.0)
    shown, said = [], []
    watch = validation.RayValidations(OrderedRayCalls(background=False), shown.append, said.append, shown=set(),
                                      results=str(results))  # fmt: skip
    watch.finish()
    assert [(m["iter"], m["bpb"]) for m in shown] == [(4, 3.0), (6, 2.95), (8, 2.9)]
    assert said == ["waiting for the validation of iter 6, 8"] and len(asked) == 2


def test_a_validation_task_leaves_its_result_in_the_run_folder(tmp_path, char_data):
    """validate_checkpoint as Ray runs it: the metrics it returns are also in validations/iter_N.json."""
    from ray.train import Checkpoint

    from raygpt.worker import validation

    torch.manual_seed(0)
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, bias=False, vocab_size=65)
    model = GPT(GPTConfig(**args))
    folder = tmp_path / "ray" / "run" / "checkpoint_2026-01-01_00-00-00.000000"
    config = {"data_dir": str(char_data), "dataset": "shakespeare_char"}
    checkpoint.save_atomic({"model": model.state_dict(), "model_args": args, "iter_num": 6, "config": config},
                           folder / checkpoint.CKPT_NAME)  # fmt: skip
    cfg = TrainConfig(storage_path=str(tmp_path / "ray"), evals="bpb")
    results = validation.results_folder(cfg, "run")
    result = validation.validate_checkpoint(Checkpoint(str(folder)), {}, str(char_data), "shakespeare_char",
                                            bpb=True, windows=4, threads=1, use_gpu=False, results=results)  # fmt: skip
    assert result["iter"] == 6 and result["bpb"] > 0
    assert json.loads((tmp_path / "ray" / "run" / "validations" / "iter_6.json").read_text()) == result
    assert validation.stored_results(results) == [result]


def test_a_rerun_keeps_the_checkpoints_evals_it_showed(tmp_path):
    from raygpt.worker.reporting import MetricsLog

    path = tmp_path / METRICS_NAME
    lines = [{"iter": 2, "train_loss": 2.0, "val_loss": 2.1}, {"iter": 2, "bpb": 3.1, "validation_seconds": 1.0},
             {"iter": 4, "train_loss": 1.9, "val_loss": 2.0}, {"iter": 4, "bpb": 3.0, "validation_seconds": 1.0},
             {"iter": 5, "loss": 1.8}, {"iter": 6, "bpb": 2.9, "validation_seconds": 1.0}]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    log = MetricsLog(path, start_iter=4)
    assert log.validated == {2, 4} and log.validation_at_start == lines[3] and log.eval_at_start == lines[2]
    assert [json.loads(line) for line in path.read_text().splitlines()] == lines[:4]
