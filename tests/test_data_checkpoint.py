"""Batch sampling, dataset checks and checkpoint files: plain numpy/torch, no Ray."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raygpt.core import checkpoint
from raygpt.core.data import Batches, DataError, validate_dataset


def write_dataset(directory, n_train=5000, n_val=1000, vocab=65):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rng.integers(0, vocab, n_train, dtype=np.uint16).tofile(directory / "train.bin")
    rng.integers(0, vocab, n_val, dtype=np.uint16).tofile(directory / "val.bin")
    return directory


def test_batches_are_a_pure_function_of_seed_iter_rank_micro(tmp_path):
    data = write_dataset(tmp_path / "d")
    a = Batches(data, block_size=16, batch_size=4, seed=1, rank=1, world_size=2, accum_steps=5)
    b = Batches(data, block_size=16, batch_size=4, seed=1, rank=1, world_size=2, accum_steps=5)
    x1, y1 = a.train_batch(7, 3)
    b.train_batch(0, 0)  # other draws in between change nothing
    x2, y2 = b.train_batch(7, 3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one
    assert not torch.equal(a.train_batch(7, 4)[0], x1)


def test_eval_windows_do_not_depend_on_rank(tmp_path):
    data = write_dataset(tmp_path / "d")
    one = Batches(data, block_size=16, batch_size=4, seed=5, rank=0, world_size=1)
    other = Batches(data, block_size=16, batch_size=4, seed=5, rank=1, world_size=2, accum_steps=1)
    assert torch.equal(one.eval_batch("val", 3)[0], other.eval_batch("val", 3)[0])


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing_dir", "not found; create it with"),
        ("missing_val", "val.bin is missing"),
        ("empty_train", "has 0 tokens, too few"),
        ("short_val", "too few for block_size"),
        ("odd_bytes", "odd number of bytes"),
        ("big_token", "holds token id 65535"),
    ],
)
def test_bad_datasets_are_refused_in_one_line(tmp_path, damage, message):
    data = write_dataset(tmp_path / "d")
    if damage == "missing_dir":
        data = tmp_path / "nope"
    elif damage == "missing_val":
        (data / "val.bin").unlink()
    elif damage == "empty_train":
        (data / "train.bin").write_bytes(b"")
    elif damage == "short_val":
        np.zeros(10, dtype=np.uint16).tofile(data / "val.bin")
    elif damage == "odd_bytes":
        (data / "train.bin").write_bytes(b"\x00" * 4001)
    elif damage == "big_token":
        tokens = np.fromfile(data / "train.bin", dtype=np.uint16)
        tokens[123] = 65535
        tokens.tofile(data / "train.bin")
    with pytest.raises(DataError) as error:
        validate_dataset(data, block_size=32, vocab_size=65)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_train_needs_one_window(tmp_path):
    data = write_dataset(tmp_path / "d", n_train=33)  # block_size + 1: every worker draws from the whole file
    validate_dataset(data, block_size=32, vocab_size=65)
    np.zeros(32, dtype=np.uint16).tofile(data / "train.bin")
    with pytest.raises(DataError, match="has 32 tokens, too few for block_size 32"):
        validate_dataset(data, block_size=32, vocab_size=65)


def good_state():
    return {"model": {"w": torch.arange(4.0)}, "model_args": {"n_layer": 1}, "iter_num": 3, "config": {"a": 1}}


def test_checkpoint_round_trip_and_atomic_replace(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save_atomic(good_state(), path)
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp files left behind


def resumable_state(iter_num: int = 3) -> dict:
    """A tiny GPT's checkpoint as training writes one: weights, model_args and an optimizer state."""
    from raygpt.core.model import GPT, GPTConfig

    model_args = dict(n_layer=1, n_head=2, n_embd=8, block_size=8, bias=False, vocab_size=16)
    torch.manual_seed(iter_num)
    model = GPT(GPTConfig(**model_args))
    optimizer = torch.optim.AdamW(model.parameters())
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": model_args,
            "iter_num": iter_num, "config": {}}  # fmt: skip


def test_a_resume_maps_the_checkpoint_file_and_reads_the_old_format_whole(tmp_path):
    """A resume maps the file (its tensors are read as they are copied into the model and optimizer, not
    into a second copy first); torch's pre-zip format cannot be mapped and is read whole."""
    path, saved = tmp_path / "ckpt.pt", resumable_state()
    checkpoint.save_atomic(saved, path)
    state, source = checkpoint.load_resume_state(fallback=path)
    assert source == str(path) and torch.equal(state["model"]["lm_head.weight"], saved["model"]["lm_head.weight"])
    assert str(path) in Path("/proc/self/maps").read_text()
    old_format = tmp_path / "old.pt"
    torch.save(saved, old_format, _use_new_zipfile_serialization=False)
    state, _ = checkpoint.load_resume_state(fallback=old_format)
    assert state["iter_num"] == 3 and torch.equal(state["model"]["lm_head.weight"], saved["model"]["lm_head.weight"])
    assert str(old_format) not in Path("/proc/self/maps").read_text()


def test_a_worker_skips_the_checkpoints_the_launcher_skips(tmp_path):
    # The launcher refuses a checkpoint whose weights are not its model_args' (read_summary); a restarted
    # worker, handed Ray's latest, must pass it over for the same reason, not fail in load_state_dict.
    from types import SimpleNamespace

    run = tmp_path / "run"
    older, latest = run / "checkpoint_2026-11-26_10-00-00.000000", run / "checkpoint_2026-11-26_10-05-00.000000"
    checkpoint.save_atomic(resumable_state(iter_num=20), older / "ckpt.pt")
    mismatched = resumable_state(iter_num=40)
    mismatched["model_args"]["n_embd"] = 16
    checkpoint.save_atomic(mismatched, latest / "ckpt.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not those of its model_args|but its model_args make it"):
        checkpoint.read_summary(latest)
    warnings = []
    ray_latest = SimpleNamespace(path=str(latest), filesystem=SimpleNamespace(type_name="local"))
    state, source = checkpoint.load_resume_state(ray_latest, warn=warnings.append)
    assert state["iter_num"] == 20 and source == str(older / "ckpt.pt")
    assert len(warnings) == 1 and "skipping checkpoint" in warnings[0] and str(latest) in warnings[0]


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save_atomic(good_state(), path)

    class Unsaveable:
        def __reduce__(self):
            raise OSError("No space left on device")

    with pytest.raises(OSError):
        checkpoint.save_atomic({**good_state(), "iter_num": 4, "bad": Unsaveable()}, path)
    assert checkpoint.load(path)["iter_num"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


DISK_FULL_SAVE = """
import resource, sys, torch
from raygpt.core import checkpoint
# The kernel refuses writes past 1 MiB in this process, as a full disk would (Python ignores SIGXFSZ).
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
checkpoint.save_atomic({"model": {"w": torch.zeros(1 << 20)}, "model_args": {}, "iter_num": 4, "config": {}},
                       sys.argv[1])
"""


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save_atomic(good_state(), path)
    result = subprocess.run([sys.executable, "-c", DISK_FULL_SAVE, str(path)], capture_output=True, text=True)
    # torch.save wraps the failed write in a RuntimeError; the one line names the cause underneath it.
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and last.startswith("raygpt.storage.files.DiskFullError: [Errno 27] cannot write "), (
        last
    )
    assert last.endswith("ckpt.pt: file too large for the file system"), last
    assert checkpoint.load(path)["iter_num"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_damaged_and_foreign_checkpoints_are_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save_atomic(good_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="damaged or truncated"):
        checkpoint.load(path)
    torch.save({"something": 1}, path)
    with pytest.raises(checkpoint.CheckpointError, match="not a GPT checkpoint"):
        checkpoint.load(path)
    path.write_text("hello")
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(path)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint at"):
        checkpoint.load(tmp_path / "missing.pt")


class Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_a_malicious_pickle_in_ckpt_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "ckpt.pt"
    torch.save({**good_state(), "evil": Payload()}, path)
    with pytest.raises(checkpoint.CheckpointError, match="refused"):
        checkpoint.load(path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_open_would_give_them(tmp_path, umask, expected):
    # A temporary file is owner-only; a dataset or checkpoint on a shared file system must not be.
    from raygpt.storage.files import write_bytes_atomic

    old = os.umask(umask)
    try:
        write_bytes_atomic(tmp_path / "train.bin", b"\x00\x01")
        torch.save({"x": 1}, tmp_path / "plain.pt")  # what a plain open() gives, for comparison
        checkpoint.save_atomic({"x": 1}, tmp_path / "ckpt.pt")
    finally:
        os.umask(old)
    for name in ("train.bin", "plain.pt", "ckpt.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


def test_a_replaced_file_keeps_its_mode(tmp_path):
    from raygpt.storage.files import write_bytes_atomic

    target = tmp_path / "meta.json"
    target.write_bytes(b"{}")
    target.chmod(0o640)
    write_bytes_atomic(target, b'{"vocab_size": 65}')
    assert target.stat().st_mode & 0o777 == 0o640
    assert target.read_bytes() == b'{"vocab_size": 65}'
