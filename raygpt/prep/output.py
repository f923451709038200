"""A dataset's output folder: DATA_DIR/NAME checked before any work, held locked while it is written, and
train.bin, val.bin and meta.json written into it, meta.json last (it marks a whole dataset).

Every output goes to a temporary file that is renamed into place (raygpt.storage.files), so a failed or
interrupted preparation leaves no partial train.bin and no temporary file, and a dataset folder it
created but could not fill is removed again. meta.json records each .bin's size and sha256, so a copy
elsewhere can be verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from raygpt.config.schema import check_name_lengths, is_plain_name
from raygpt.core.tokenizer import TOKEN_DTYPE
from raygpt.errors import RaygptError
from raygpt.storage.files import (
    DiskFullError,
    is_locked_exclusively,
    lock_exclusive,
    remove_empty_folders,
    remove_orphaned_temporaries,
    write_atomic,
    write_text_atomic,
)

# A split needs one (input, target) pair to be trained or evaluated at all; the launcher checks it
# against the real block_size.
MIN_SPLIT_TOKENS = 2
# Below this, val loss is measured on a few dozen distinct windows (39 of nanoGPT's 256-character
# context for shakespeare_char): noisy, and larger contexts cannot be evaluated at all.
USEFUL_VAL_TOKENS = 10_000
OUTPUT_NAMES = ("train.bin", "val.bin", "meta.json", "input.txt")


class PrepareError(RaygptError):
    """Bad input to data preparation; the message is one line."""


def check_dataset_name(name: str) -> None:
    if not is_plain_name(name) or "\0" in name or "?" in name:
        raise PrepareError(f"dataset name {name!r} must be a plain folder name (no '/' or '?', not '.' or '..')")
    check_name_lengths("dataset name", name)


def dataset_folder(data_dir: str | Path, name: str) -> Path:
    """DATA_DIR/NAME, after checking it can be made there (no part of it is a file), before any work.
    Absolute, as the launcher has it: every line prepare prints names the folder the same way."""
    check_dataset_name(name)
    dataset_dir = Path(os.path.realpath(Path(data_dir).expanduser())) / name
    for path in (dataset_dir, *dataset_dir.parents):
        try:
            mode = os.stat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue  # made later; the first existing folder above it decides
        except OSError as e:
            raise PrepareError(f"cannot use {path} for the outputs: {e.strerror}") from None
        if not stat.S_ISDIR(mode) and path == dataset_dir:
            raise PrepareError(f"{path} is a file, not a dataset folder; choose another --name or --data-dir")
        if not stat.S_ISDIR(mode):
            raise PrepareError(
                f"{path} is a file, not a folder for the outputs ({dataset_dir}); choose another --data-dir"
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise PrepareError(f"{path} is not writable: the outputs go to {dataset_dir}")
        break
    return dataset_dir


@contextlib.contextmanager
def output_folder(dataset_dir: Path) -> Iterator[None]:
    """Create dataset_dir (and missing parents) for outputs that are ready to be written, and hold it
    locked for the block: what another preparation killed there left (its temporary files) is removed
    first, and a second preparation of the same folder at the same time is refused. If the block fails,
    the folders made here are removed while still empty: nothing is left that looks prepared."""
    created = []
    for path in (dataset_dir, *dataset_dir.parents):
        if os.path.lexists(path):
            break
        created.append(path)
    try:
        dataset_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"cannot create {dataset_dir}: {e.strerror}") from None
    try:
        with folder_lock(dataset_dir):
            left = [tmp for name in OUTPUT_NAMES for tmp in remove_orphaned_temporaries(dataset_dir, name)]
            if left:
                print(f"removed {len(left)} temporary file(s) a killed run left in {dataset_dir}", file=sys.stderr)
            try:
                yield
            except BaseException:
                # write_atomic removes its temporary file, unless the failure (a Ctrl-C) came between its
                # creation and write_atomic's own cleanup.
                for name in OUTPUT_NAMES:
                    remove_orphaned_temporaries(dataset_dir, name)
                raise
    except BaseException as e:
        remove_empty_folders(created)
        if isinstance(e, DiskFullError):
            raise PrepareError(e.strerror) from None
        if isinstance(e, OSError):
            raise PrepareError(f"cannot write to {dataset_dir}: {e.strerror or e}") from None
        raise


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on the folder itself (flock on its descriptor): it leaves no file behind, and the
    kernel releases it when the process dies, however it dies. A run training on the folder holds a shared
    one (raygpt.core.data): its files are not replaced under it."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        lock_exclusive(fd, when_held=lambda: refuse_while_in_use(fd, folder))
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def refuse_while_in_use(fd: int, folder: Path) -> None:
    if is_locked_exclusively(fd):
        raise PrepareError(
            f"another raygpt.prepare is writing {folder}; wait for it to finish, or choose another --name"
        )
    raise PrepareError(
        f"a run is training on {folder}: preparing it now would replace its files under it; wait for the run "
        "to end, or choose another --name (and train on that with --dataset)"
    )


class ChecksummedWriter:
    """A file's write() that also counts the bytes and hashes them: a multi-GB file is not read twice."""

    def __init__(self, f: BinaryIO):
        self.f, self.bytes, self.digest = f, 0, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        self.bytes += memoryview(data).nbytes  # len() of a uint16 array's buffer counts items, not bytes
        return self.f.write(data)

    def record(self) -> dict:
        return {"bytes": self.bytes, "sha256": self.digest.hexdigest()}


def write_dataset(dataset_dir: Path, meta: dict, write_splits: Callable[[BinaryIO, BinaryIO], None]) -> None:
    """write_splits(train_file, val_file) into temporary files, renamed to train.bin and val.bin once it
    returns; then meta.json, with each file's size and sha256. A meta.json marks a whole dataset: an old
    one is removed only when both new files are written, just before they are renamed, and the new one
    comes last."""
    files = {}

    def write_val(train_file: BinaryIO) -> None:
        def write_both(val_file: BinaryIO) -> None:
            train, val = ChecksummedWriter(train_file), ChecksummedWriter(val_file)
            write_splits(train, val)
            files.update({"train.bin": train.record(), "val.bin": val.record()})
            (dataset_dir / "meta.json").unlink(missing_ok=True)

        write_atomic(dataset_dir / "val.bin", write_both)

    write_atomic(dataset_dir / "train.bin", write_val)
    meta = {**meta, "dtype": TOKEN_DTYPE, "files": files}
    write_text_atomic(dataset_dir / "meta.json", json.dumps(meta, ensure_ascii=False))


def write_arrays(train: np.ndarray, val: np.ndarray) -> Callable[[BinaryIO, BinaryIO], None]:
    def write_splits(train_file: BinaryIO, val_file: BinaryIO) -> None:
        train_file.write(train.data)
        val_file.write(val.data)

    return write_splits


def check_splits(name: str, train_tokens: int, val_tokens: int, hint: str) -> None:
    """Refuse a split too small to train or evaluate at all; warn when val is too small to be useful."""
    for split, tokens, use in (("train", train_tokens, "train on"), ("val", val_tokens, "evaluate")):
        if tokens < MIN_SPLIT_TOKENS:
            raise PrepareError(
                f"{name}: the {split} split has {tokens} tokens, too few to {use} at all "
                f"(needs at least {MIN_SPLIT_TOKENS}); {hint}"
            )
    if val_tokens < USEFUL_VAL_TOKENS:
        print(
            f"warning: {name}: the val split has only {val_tokens:,} tokens (under {USEFUL_VAL_TOKENS:,}): its "
            f"loss will be noisy, and no block_size of {val_tokens} or more can be evaluated; {hint}",
            file=sys.stderr,
            flush=True,
        )
