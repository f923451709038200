"""Issue 31, kinds 3-5: which dataset a run continues on, token files that disagree with their meta.json,
and a dataset replaced under a running run. Fast tier: local-mode launches through the CLI, no Ray."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_LOCAL_RUN

from raygpt import launch
from raygpt.core.data import Batches, DataError, _sample_chunks, validate_dataset
from raygpt.errors import EXIT_REFUSED
from raygpt.prep.output import folder_lock, write_arrays, write_dataset
from raygpt.prep.shakespeare import prepare_shakespeare_char
from raygpt.storage import datasets
from raygpt.storage.datasets import STAMP_NAME


def run_launch(argv, capsys) -> tuple[int, str, str]:
    code = launch.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def assert_refused(code: int, err: str, *needles: str) -> None:
    assert code == EXIT_REFUSED and err.startswith("error: ") and "\n" not in err, (code, err)
    for needle in needles:
        assert needle in err, err


def continuing_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("raygpt: continuing"))


@pytest.fixture
def dataset(tmp_path, char_data) -> Path:
    """A private copy of the prepared shakespeare_char (its meta.json records sizes and sha256s), without
    the stamp an earlier launch on it may have left (a copy keeps the modification times it trusts)."""
    copy = tmp_path / "data" / "shakespeare_char"
    shutil.copytree(char_data / "shakespeare_char", copy, ignore=shutil.ignore_patterns(STAMP_NAME))
    return copy


def tiny_run(dataset: Path, out: Path, *extra) -> list:
    storage = out.with_name(f"{out.name}-ray")
    return [*TINY_LOCAL_RUN, f"--data_dir={dataset.parent}", f"--out_dir={out}", f"--storage_path={storage}", *extra]


# ---- kind 4: files that disagree with their meta.json -----------------------------------------------


def test_a_train_bin_cut_short_is_refused_before_training(dataset, tmp_path, capsys):
    data = (dataset / "train.bin").read_bytes()
    (dataset / "train.bin").write_bytes(data[: len(data) // 20 // 2 * 2])  # 5% of the size meta.json records
    code, out, err = run_launch(tiny_run(dataset, tmp_path / "out"), capsys)
    assert_refused(code, err, f"{dataset}/train.bin has 100,384 bytes but meta.json records 2,007,708",
                   "re-run `python -m raygpt.prepare shakespeare_char")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_token_files_of_another_width_are_refused(dataset, tmp_path, capsys):
    """Behind a meta.json that records the files: the size tells. Behind one written by hand that says
    uint16 and records nothing: the width check runs whatever meta.json says."""
    tokens = np.fromfile(dataset / "train.bin", dtype=np.uint16)
    tokens.astype(np.uint32).tofile(dataset / "train.bin")
    code, _, err = run_launch(tiny_run(dataset, tmp_path / "out"), capsys)
    assert_refused(code, err, "train.bin has 4,015,416 bytes but meta.json records 2,007,708")

    meta = json.loads((dataset / "meta.json").read_text())
    del meta["files"]
    (dataset / "meta.json").write_text(json.dumps(meta))
    assert meta["dtype"] == "uint16"
    with pytest.raises(DataError, match="train.bin looks like 32-bit tokens"):
        validate_dataset(dataset, block_size=16, vocab_size=65)


def test_hashes_are_verified_once_and_a_changed_file_again(dataset, monkeypatch):
    hashed = []
    file_sha256 = datasets.file_sha256
    monkeypatch.setattr(datasets, "file_sha256", lambda path: hashed.append(path.name) or file_sha256(path))
    monkeypatch.setattr(datasets, "SAY_VERIFYING_BYTES", 1 << 20)  # said where it takes a while (2.2 MB here)
    lines = []
    validate_dataset(dataset, block_size=16, vocab_size=65, progress=lines.append)
    assert hashed == ["train.bin", "val.bin"] and (dataset / STAMP_NAME).is_file()
    assert lines == [f"verifying {dataset} against meta.json's sha256s (0.0 GB; once, then a stamp)"]
    validate_dataset(dataset, block_size=16, vocab_size=65)
    assert hashed == ["train.bin", "val.bin"]  # the stamp says they passed: not hashed again

    data = bytearray((dataset / "val.bin").read_bytes())
    data[1000:1002], data[1002:1004] = data[1002:1004], data[1000:1002]  # two tokens swapped: another file
    (dataset / "val.bin").write_bytes(data)
    with pytest.raises(DataError, match=r"val.bin is not the file meta.json records \(its sha256 differs\)"):
        validate_dataset(dataset, block_size=16, vocab_size=65)


def unsampled_positions(n_tokens: int) -> np.ndarray:
    """The positions of a token file that validate_dataset's sample does not read."""
    sampled = np.zeros(n_tokens, dtype=bool)
    positions = np.arange(n_tokens)
    for chunk in _sample_chunks(positions):
        sampled[chunk] = True
    return np.flatnonzero(~sampled)


def test_an_out_of_range_token_found_in_training_names_file_and_position(tmp_path, capsys):
    """Ids past the vocabulary where the data check does not look, behind a meta.json whose records match
    (prepared elsewhere, with a wrong table): the first batch that holds one stops the run in one line."""
    n_tokens = 3_000_000
    train = np.random.default_rng(0).integers(0, 65, n_tokens).astype(np.uint16)
    train[unsampled_positions(n_tokens)] = 70
    val = train[:20_000].copy()
    folder = tmp_path / "data" / "odd"
    folder.mkdir(parents=True)
    meta = {"vocab_size": 65, "tokenizer": "char", "chars": [chr(33 + i) for i in range(65)]}
    write_dataset(folder, meta, write_arrays(train, val))
    validate_dataset(folder, block_size=16, vocab_size=65)  # the sample sees no id past 64

    code, _, err = run_launch(tiny_run(folder, tmp_path / "out", "--dataset=odd"), capsys)
    assert_refused(code, err, f"{folder}/train.bin holds token id 70 at token ", "but the model's vocab_size is 65")
    position = int(err.split(" at token ")[1].split()[0].replace(",", ""))
    assert train[position] == 70


def test_the_batch_check_costs_the_step_nothing_measurable(char_data):
    import timeit

    batches = Batches(char_data / "shakespeare_char", 1024, 12, seed=1, vocab_size=65)
    unchecked = Batches(char_data / "shakespeare_char", 1024, 12, seed=1)
    checked_s = min(timeit.repeat(lambda: batches.train_batch(3, 0), number=50, repeat=5)) / 50
    unchecked_s = min(timeit.repeat(lambda: unchecked.train_batch(3, 0), number=50, repeat=5)) / 50
    # nanoGPT's batch of 12 x 1024: the max over its ids is microseconds, next to a step's milliseconds
    assert checked_s - unchecked_s < 100e-6, (checked_s, unchecked_s)
    assert torch.equal(batches.train_batch(3, 0)[0], unchecked.train_batch(3, 0)[0])


# ---- kind 5: a dataset replaced under a running run -------------------------------------------------


def test_prepare_refuses_while_a_run_reads_the_folder(dataset, shakespeare_path):
    batches = Batches(dataset, 16, 4, seed=1, vocab_size=65)  # what each worker holds while it trains
    before = {p.name: p.read_bytes() for p in dataset.iterdir()}
    command = [sys.executable, "-m", "raygpt.prepare", "shakespeare_char", "--input", str(shakespeare_path),
               "--data-dir", str(dataset.parent)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: a run is training on {dataset}: preparing it now would replace its files")
    assert {p.name: p.read_bytes() for p in dataset.iterdir()} == before
    batches.read_lock.release()  # the run ended
    assert subprocess.run(command, capture_output=True, text=True).returncode == 0


def test_a_run_does_not_start_on_a_folder_being_prepared(dataset, tmp_path, capsys):
    with folder_lock(dataset):  # a raygpt.prepare writing it now
        code, _, err = run_launch(tiny_run(dataset, tmp_path / "out"), capsys)
    assert_refused(code, err, f"raygpt.prepare is writing {dataset} now: wait for it to finish")


# ---- kind 3: which dataset is this? -----------------------------------------------------------------


def prepare_from(text: str, dataset: Path) -> None:
    source = dataset.parent / "input.txt"
    source.write_text(text)
    prepare_shakespeare_char(dataset.parent, input_path=source)  # into data_dir/shakespeare_char
    source.unlink()


@pytest.fixture
def trained(tmp_path, shakespeare_path, capsys) -> tuple[Path, Path, str]:
    """A tiny run on a dataset of the first 200,000 characters; returns the dataset, out_dir and text."""
    text = shakespeare_path.read_text()[:200_000]
    dataset = tmp_path / "data" / "shakespeare_char"
    dataset.parent.mkdir()
    prepare_from(text, dataset)
    code, _, err = run_launch(tiny_run(dataset, tmp_path / "out"), capsys)
    assert code == 0, err
    return dataset, tmp_path / "out", text


def test_a_dataset_prepared_from_another_text_with_as_many_tokens_is_refused(trained, capsys):
    dataset, out, text = trained
    vocab = sorted(set(text))
    other = text.translate({ord(vocab[-1]): "~"})  # one character swapped: 65 tokens still, ids shifted
    assert "~" not in text and len(set(other)) == len(vocab)
    prepare_from(other, dataset)
    code, _, err = run_launch(tiny_run(dataset, out, "--max_iters=6"), capsys)
    n = len(vocab)
    assert_refused(code, err, f"was trained with another model or data: the dataset's vocabulary (char vocabulary "
                   f"of {n}) is another than the checkpoint's (char vocabulary of {n}): a vocabulary of the same "
                   "size whose token ids mean other tokens", "--fresh")  # fmt: skip

    from raygpt import sample

    sampled = sample.main(["--out-dir", str(out), "--device", "cpu", "--max-new-tokens", "2", "--start", "A"])
    err = capsys.readouterr().err.strip()
    assert sampled == EXIT_REFUSED and "\n" not in err, err
    assert "describes another vocabulary than the one the checkpoint was trained on" in err


def test_data_that_grew_is_named_on_the_continuing_line(trained, shakespeare_path, capsys):
    dataset, out, text = trained
    prepare_from(shakespeare_path.read_text()[:300_000], dataset)  # more of the same text, the same characters
    code, out_text, err = run_launch(tiny_run(dataset, out, "--max_iters=6"), capsys)
    assert code == 0, err
    line = continuing_line(out_text)
    assert "shakespeare_char/train.bin 180,000 -> 270,000 tokens, the same vocabulary" in line
    assert "shakespeare_char/val.bin 20,000 -> 30,000 tokens" in line


def test_a_changed_data_dir_is_named_and_the_same_data_is_not(trained, tmp_path, capsys):
    dataset, out, _ = trained
    moved = tmp_path / "elsewhere" / "shakespeare_char"
    shutil.copytree(dataset, moved)
    code, out_text, err = run_launch(tiny_run(moved, out, "--max_iters=6"), capsys)
    assert code == 0, err
    line = continuing_line(out_text)
    assert f"data_dir '{dataset.parent}' -> '{moved.parent}'" in line and "train.bin" not in line


def test_a_checkpoint_without_the_record_still_resumes(trained, capsys):
    dataset, out, text = trained
    state = torch.load(out / "ckpt.pt", weights_only=True)
    del state["dataset"]
    torch.save(state, out / "ckpt.pt")
    prepare_from(text.translate({ord(sorted(set(text))[-1]): "~"}), dataset)  # nothing to compare with
    code, out_text, err = run_launch(tiny_run(dataset, out, "--max_iters=6"), capsys)
    assert code == 0, err
    assert "from iter 4" in continuing_line(out_text)


def test_a_worker_finding_the_dataset_prepared_again_since_the_launchers_check_stops(trained, monkeypatch, capsys):
    """As a worker Ray restarts after the dataset was prepared again finds it: the launcher's check passed
    (here: switched off), the worker's own comparison with the checkpoint it resumes refuses."""
    from raygpt.driver import plan

    dataset, out, text = trained
    prepare_from(text.translate({ord(sorted(set(text))[-1]): "~"}), dataset)
    monkeypatch.setattr(plan, "vocabulary_change", lambda saved, current: None)
    code, _, err = run_launch(tiny_run(dataset, out, "--max_iters=6"), capsys)
    assert_refused(code, err, f"{out}/ckpt.pt: the dataset's vocabulary", "prepared again while the run went on")


def test_prepare_is_refused_while_a_real_run_trains_on_the_folder(dataset, tmp_path, shakespeare_path):
    """Through both CLIs: a local-mode run training, and raygpt.prepare into its dataset folder meanwhile."""
    import os
    import signal
    import time

    argv = tiny_run(dataset, tmp_path / "out", "--max_iters=100000", "--eval_interval=100000", "--log_interval=1")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.Popen([sys.executable, "-m", "raygpt.launch", *argv], stdout=subprocess.PIPE, text=True, env=env)
    try:
        for line in run.stdout:  # the run reads its batches from here on
            if line.startswith("iter 1:"):
                break
        else:
            pytest.fail(f"the run ended first (exit {run.wait()})")
        before = {p.name: p.read_bytes() for p in dataset.iterdir()}
        command = [sys.executable, "-m", "raygpt.prepare", "shakespeare_char", "--input", str(shakespeare_path),
                   "--data-dir", str(dataset.parent)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        assert done.returncode == 2 and done.stderr.startswith(f"error: a run is training on {dataset}: "), done.stderr
        assert {p.name: p.read_bytes() for p in dataset.iterdir()} == before
        assert run.poll() is None  # still training
    finally:
        run.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 60
        while run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if run.poll() is None:
            run.kill()
        run.wait()
