"""The launcher's rules as pure functions, without Ray or a run: which reruns are refused (and with which
words), the order in which checkpoints are tried on a resume, the CPU share of a worker, and the paths
made absolute before the workers chdir."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from raygpt.config.schema import TrainConfig
from raygpt.core.checkpoint import resume_candidates
from raygpt.driver.plan import WAYS_OUT, already_finished, changed_since, cpu_share, resume_refusal
from raygpt.driver.preflight import absolute_paths

WHERE = "run 'out' (/runs/out/ckpt.pt)"
MODEL = dict(n_layer=2, n_head=2, n_embd=8, block_size=16, bias=False, vocab_size=65)


def summary(iter_num: int = 4, **config) -> dict:
    return {"model_args": dict(MODEL), "iter_num": iter_num, "config": {"dataset": "shakespeare_char", **config}}


def rerun(**keys) -> TrainConfig:
    model = {key: value for key, value in MODEL.items() if key != "vocab_size"}  # the dataset's, not a key
    return TrainConfig(**{"dataset": "shakespeare_char", "max_iters": 10, **model, **keys})


def test_a_rerun_of_the_same_run_is_not_refused():
    assert resume_refusal(rerun(), {"max_iters"}, WHERE, summary(), {"tokenizer": "char", "vocab_size": 65}) is None


def test_explicit_scratch_is_refused_before_the_checkpoint_is_read():
    refusal = resume_refusal(rerun(init_from="scratch"), {"init_from"}, WHERE, None, None)
    assert refusal == f"init_from=scratch, but {WHERE} has checkpoints: {WAYS_OUT}"
    assert resume_refusal(rerun(init_from="scratch"), set(), WHERE, summary(), None) is None  # the default


def test_another_model_is_refused_for_the_keys_given_only():
    refusal = resume_refusal(rerun(n_layer=3), {"n_layer"}, WHERE, summary(), None)
    assert refusal == f"{WHERE} was trained with another model or data: n_layer=3 (checkpoint: 2); {WAYS_OUT}"
    assert resume_refusal(rerun(n_layer=3), set(), WHERE, summary(), None) is None  # the checkpoint's wins


def test_another_dataset_or_character_vocabulary_is_refused():
    other = resume_refusal(rerun(dataset="openwebtext"), set(), WHERE, summary(), None)
    assert other.startswith(f"{WHERE} was trained with another model or data: dataset=openwebtext (checkpoint: ")
    vocab = resume_refusal(rerun(), set(), WHERE, summary(), {"tokenizer": "char", "vocab_size": 70})
    assert "the dataset's vocab_size 70 (checkpoint: 65)" in vocab
    assert resume_refusal(rerun(), set(), WHERE, summary(), {"tokenizer": "gpt2", "vocab_size": 70}) is None


def identity(chars: str = "abc", train_bytes: int = 2000, train_sha: str = "1" * 64) -> dict:
    """A dataset's identity: a character vocabulary (none: no meta.json) and train.bin's record."""
    from raygpt.core.data import dataset_identity

    if not chars:
        return dataset_identity(None)
    files = {"train.bin": {"bytes": train_bytes, "sha256": train_sha}, "val.bin": {"bytes": 200, "sha256": "0" * 64}}
    return dataset_identity({"vocab_size": len(chars), "tokenizer": "char", "chars": list(chars), "files": files})


def test_token_ids_that_mean_other_tokens_are_refused_whatever_the_vocab_size():
    trained = {**summary(), "dataset": identity("abc")}
    same = resume_refusal(rerun(), set(), WHERE, trained, None, identity("abc", train_bytes=4000, train_sha="2" * 64))
    assert same is None  # more data, the same vocabulary
    swapped = resume_refusal(rerun(), set(), WHERE, trained, None, identity("abd"))
    assert ("the dataset's vocabulary (char vocabulary of 3) is another than the checkpoint's (char vocabulary of "
            "3): a vocabulary of the same size whose token ids mean other tokens") in swapped  # fmt: skip
    no_meta = resume_refusal(rerun(), set(), WHERE, trained, None, identity(""))
    assert "the dataset's vocabulary (no meta) is another than the checkpoint's (char vocabulary of 3)" in no_meta
    assert resume_refusal(rerun(), set(), WHERE, summary(), None, identity("abd")) is None  # an older checkpoint


def test_the_continuing_line_names_the_data_dir_and_the_data_that_changed():
    from raygpt.driver.plan import dataset_changes

    trained = {**summary(data_dir="/data"), "dataset": identity("abc")}
    assert dataset_changes(rerun(data_dir="/data"), trained, identity("abc")) == []
    assert dataset_changes(rerun(data_dir="/other"), trained, identity("abc")) == ["data_dir '/data' -> '/other'"]
    grown = dataset_changes(rerun(data_dir="/data"), trained, identity("abc", train_bytes=4000, train_sha="2" * 64))
    assert grown == ["shakespeare_char/train.bin 1,000 -> 2,000 tokens, the same vocabulary"]
    again = dataset_changes(rerun(data_dir="/data"), trained, identity("abc", train_sha="2" * 64))
    assert again == ["shakespeare_char/train.bin prepared again (as many tokens), the same vocabulary"]
    assert dataset_changes(rerun(data_dir="/data"), summary(data_dir="/data"), identity("abd")) == []


def test_a_run_at_max_iters_has_nothing_to_do_unless_it_only_evaluates():
    assert resume_refusal(rerun(max_iters=4), set(), WHERE, summary(iter_num=4), None) is None  # no refusal
    finished = already_finished(rerun(max_iters=4), WHERE, summary(iter_num=4))
    assert finished.startswith(f"{WHERE} is already at iter 4 (max_iters 4): nothing to do; pass a larger --max_iters")
    assert already_finished(rerun(max_iters=4, eval_only=True), WHERE, summary(iter_num=4)) is None
    assert already_finished(rerun(max_iters=5), WHERE, summary(iter_num=4)) is None


def test_what_changed_since_names_the_keys_that_matter_and_the_workers():
    saved = {"learning_rate": 6e-4, "max_iters": 4, "num_workers": 1}
    assert changed_since(rerun(learning_rate=1e-3, max_iters=20, num_workers=2), saved) == [
        "learning_rate 0.0006 -> 0.001",  # max_iters is free to change
        "workers 1 -> 2 (the same batches: the global batch does not depend on the worker count)",
    ]
    assert changed_since(rerun(num_workers=0), {"num_workers": 2}) == [
        "workers 2 -> auto (the same batches: the global batch does not depend on the worker count)"
    ]


def test_the_resume_order_is_one_for_the_launcher_and_a_restarted_worker(tmp_path):
    run = tmp_path / "run"
    names = ["checkpoint_2026-11-26_10-00-00.000000", "checkpoint_2026-11-26_10-05-00.000000",
             "checkpoint_2026-11-26_10-10-00.000000"]  # fmt: skip
    for name in names:
        (run / name).mkdir(parents=True)
    oldest, middle, latest = (run / name for name in names)
    fallback = tmp_path / "out" / "ckpt.pt"
    # A restarted worker is handed Ray's latest: the older ones beside it follow, then out_dir's.
    ray_latest = SimpleNamespace(path=str(latest), filesystem=SimpleNamespace(type_name="local"))
    assert resume_candidates(ray_latest, fallback=fallback) == [latest, middle, oldest, fallback]
    # The launcher lists the run itself: the same order.
    assert resume_candidates(latest, [middle, oldest]) == resume_candidates(latest) == [latest, middle, oldest]
    # In object storage: Ray's latest as it is, then the listed ones; without Ray's, out_dir's alone.
    remote = SimpleNamespace(path="bucket/run/checkpoint_3", filesystem=SimpleNamespace(type_name="s3"))
    assert resume_candidates(remote, fallback=fallback) == [remote, fallback]
    assert resume_candidates("s3://b/run/c_3", ["s3://b/run/c_2"]) == ["s3://b/run/c_3", "s3://b/run/c_2"]
    assert resume_candidates(fallback=fallback) == [fallback]


@pytest.mark.parametrize(
    "cpus, workers, use_gpu, share",
    [
        (8, 2, False, 4.0),
        (8, 3, False, 2.0),
        (1, 4, False, 1.0),
        (64, 8, True, 4.0),
        (6, 4, True, 1.0),
        (8, 0, False, 1.0),
    ],
)
def test_a_workers_cpu_share(cpus, workers, use_gpu, share):
    assert cpu_share(cpus, workers, use_gpu) == share


def test_absolute_paths_makes_a_relative_init_from_folder_absolute_and_leaves_the_named_sources(tmp_path, monkeypatch):
    """Ray Train workers chdir into a folder of their own before the loop reads the config: the launcher
    hands them an absolute GPT-2 folder (and never touches scratch, resume or a GPT-2 name)."""
    folder = tmp_path / "gpt2-local"
    folder.mkdir()
    config = {"n_layer": 2, "n_head": 2, "n_embd": 8, "vocab_size": 50257, "n_positions": 64}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(TrainConfig(init_from="./gpt2-local", block_size=64))
    assert cfg.init_from == str(folder)
    monkeypatch.chdir(tmp_path / "gpt2-local")  # a worker's folder
    assert TrainConfig.from_dict(cfg.to_dict()).init_from == str(folder)
    for name in ("scratch", "resume", "gpt2"):
        assert absolute_paths(TrainConfig(init_from=name)).init_from == name
    assert Path(cfg.out_dir).is_absolute()
