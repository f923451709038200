"""Memmapped token files, deterministic batch positions, and host-to-device transfer. No Ray here.

Batch positions are a pure function of (seed, split, iteration, global micro-batch), never of a
running RNG or of the worker count: a resumed or restarted run, on the same number of workers or
another, draws exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import numpy as np
import torch

from raygpt.core.tokenizer import MAX_META_BYTES, MetaError, read_meta, vocabulary_digest
from raygpt.errors import RaygptError
from raygpt.storage.datasets import TOKEN_FILES, verify_once
from raygpt.storage.files import FolderReadLock, read_regular_file

# Stream ids keep the training draws, the eval draws of each split, and anything added later apart.
TRAIN_STREAM, EVAL_TRAIN_STREAM, EVAL_VAL_STREAM = 0, 1, 2


class DataError(RaygptError, ValueError):
    """A dataset that cannot be trained on; the message is one line and says how to fix it."""


def validate_dataset(dataset_dir: str | Path, block_size: int, vocab_size: int, progress=print) -> None:
    """Refuse, before any worker starts, data that would crash or silently corrupt training. Every worker
    draws from the whole of train.bin, so the worker count does not matter here. The token files' sizes are
    checked against meta.json's record always, their sha256s once (a stamp remembers it). Read under the
    folder's shared lock, so that raygpt.prepare does not replace the files meanwhile (one writing them now
    is named in a refusal)."""
    dataset_dir = Path(dataset_dir)
    prepare = f"python -m raygpt.prepare {dataset_dir.name} --data-dir {dataset_dir.parent}"
    info = _stat(dataset_dir)
    if info is None:
        raise DataError(f"dataset folder {dataset_dir} not found; create it with `{prepare}`")
    if not stat.S_ISDIR(info.st_mode):
        raise DataError(f"dataset path {dataset_dir} is not a folder; it must hold train.bin, val.bin and meta.json")
    with reading(dataset_dir):
        try:
            meta = read_meta(dataset_dir)  # refuses a meta.json naming another dtype
        except MetaError as e:
            raise DataError(str(e)) from None
        records = recorded_files(meta)
        for split in ("train", "val"):
            _check_token_file(dataset_dir / f"{split}.bin", records, block_size, vocab_size, prepare)
        if records:
            meta_bytes = read_regular_file(dataset_dir / "meta.json", MAX_META_BYTES)
            mismatch = verify_once(dataset_dir, meta_bytes, records, progress)
            if mismatch:
                raise DataError(
                    f"{dataset_dir / mismatch} is not the file meta.json records (its sha256 differs): it was "
                    f"changed after preparation; re-run `{prepare}`"
                )


def _check_token_file(path: Path, records: dict, block_size: int, vocab_size: int, prepare: str) -> None:
    """One token file: a regular file, of the size meta.json records (where it records one), long enough
    for one window, of uint16 tokens, with no sampled id past the vocabulary."""
    info = _stat(path)
    if info is None:
        raise DataError(f"{path} is missing; re-run `{prepare}`")
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise DataError(f"{path} is {kind}, not a token file; re-run `{prepare}`")
    record = records.get(path.name)
    if record is not None and info.st_size != record["bytes"]:
        raise DataError(
            f"{path} has {info.st_size:,} bytes but meta.json records {record['bytes']:,}: it was changed or cut "
            f"short after preparation; re-run `{prepare}`"
        )
    if info.st_size % 2:
        raise DataError(f"{path} has an odd number of bytes: not a uint16 token file")
    n_tokens = info.st_size // 2
    # Every worker draws windows from the whole file, so one window is enough whatever their number.
    needed = block_size + 1
    if n_tokens < needed:
        raise DataError(f"{path} has {n_tokens} tokens, too few for block_size {block_size} (needs at least {needed})")
    try:
        chunks = _sample_chunks(np.memmap(path, dtype=np.uint16, mode="r"))
    except OSError as e:  # unreadable (permissions) or unmappable
        raise DataError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    # Whatever meta.json says: one written by hand (or none, nanoGPT's) may stand over files of another width.
    bits = _wider_token_bits(chunks)
    if bits:
        wide = "uint32" if bits == 32 else "int64"
        raise DataError(
            f"{path} looks like {bits}-bit tokens (every second 16-bit word is 0) but raygpt reads uint16 "
            f"token files: prepare it with `{prepare}`, or convert it with "
            f"np.fromfile(path, dtype=np.{wide}).astype(np.uint16).tofile(path)"
        )
    sample_max = max(int(chunk.max()) for chunk in chunks)
    if sample_max >= vocab_size:
        raise DataError(
            f"{path} holds token id {sample_max} but the model's vocab_size is {vocab_size}; "
            "was the data prepared with another tokenizer than meta.json says?"
        )


def recorded_files(meta: dict | None) -> dict[str, dict]:
    """{'train.bin': {'bytes': n, 'sha256': hex}, ...} as meta.json records them (raygpt.prepare does),
    or {} where it records none for some token file (a meta.json written elsewhere, or a meta.pkl)."""
    files = meta.get("files") if meta else None
    records = {}
    for name in TOKEN_FILES:
        record = files.get(name) if isinstance(files, dict) else None
        if not (isinstance(record, dict) and isinstance(record.get("bytes"), int)
                and re.fullmatch(r"[0-9a-f]{64}", str(record.get("sha256")))):  # fmt: skip
            return {}
        records[name] = {"bytes": record["bytes"], "sha256": record["sha256"]}
    return records


def dataset_identity(meta: dict | None, dataset_dir: str | Path | None = None) -> dict:
    """What a checkpoint records of the data it was trained on, and a resume compares: what the token ids
    mean (vocabulary_digest, with the tokenizer and vocab_size to name it; None: no meta, GPT-2 BPE), and
    train.bin's and val.bin's size and sha256 as meta.json records them (else their sizes on disk)."""
    files = recorded_files(meta)
    if not files and dataset_dir is not None:
        sizes = {name: _stat(Path(dataset_dir) / name) for name in TOKEN_FILES}
        files = {name: {"bytes": info.st_size} for name, info in sizes.items() if info is not None}
    return {
        "vocabulary_sha256": vocabulary_digest(meta),
        "tokenizer": meta.get("tokenizer") if meta else None,
        "vocab_size": meta.get("vocab_size") if meta else None,
        "files": files,
    }


def vocabulary_change(saved: dict | None, current: dict | None) -> str | None:
    """Where the token ids of the dataset now (a dataset_identity) mean other tokens than those of the data
    a checkpoint was trained on (`saved`, its record; None for an older checkpoint): what changed, else None."""
    if not saved or not current or saved.get("vocabulary_sha256") == current.get("vocabulary_sha256"):
        return None

    def spelled(identity: dict) -> str:
        tokenizer = identity.get("tokenizer")
        return f"{tokenizer} vocabulary of {identity.get('vocab_size')}" if tokenizer else "no meta"

    same_size = " of the same size" if saved.get("vocab_size") == current.get("vocab_size") else ""
    return (f"the dataset's vocabulary ({spelled(current)}) is another than the checkpoint's ({spelled(saved)}): "
            f"a vocabulary{same_size} whose token ids mean other tokens")  # fmt: skip


def reading(dataset_dir: str | Path) -> FolderReadLock:
    """The dataset folder's shared lock, held while its files are read: raygpt.prepare refuses to replace
    them meanwhile. A preparation writing the folder now is refused here in turn."""
    try:
        return FolderReadLock(dataset_dir, when_written=lambda: _refuse_while_written(Path(dataset_dir)))
    except OSError as e:
        raise DataError(f"cannot read {dataset_dir}: {e.strerror or type(e).__name__}") from None


def _refuse_while_written(dataset_dir: Path) -> None:
    raise DataError(f"raygpt.prepare is writing {dataset_dir} now: wait for it to finish, then run again")


def _stat(path: Path) -> os.stat_result | None:
    """os.stat(path), None when it does not exist; a symlink loop or an unreadable path is one line."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def _sample_chunks(data: np.ndarray) -> list[np.ndarray]:
    """The head of a token file and 16 chunks spread over it: checking every token of a multi-GB file
    would take minutes. Each chunk starts at a multiple of 4, so a word's position in its chunk has the
    parity (and the remainder mod 4) its position in the file has."""
    chunk = 1 << 16
    starts = np.linspace(0, max(0, len(data) - chunk), 16, dtype=np.int64) // 4 * 4
    return [data[: 1 << 20], *(data[start : start + chunk] for start in starts)]


# Enough sampled words that real uint16 text never has all of its odd-position ones 0 by chance.
MIN_WORDS_FOR_WIDTH_CHECK = 1024


def _wider_token_bits(chunks: list[np.ndarray]) -> int | None:
    """32 or 64 when the sampled 16-bit words look like little-endian uint32 or int64 token ids (ids
    below 65536 leave every odd-position word 0, and for 64 bits every word at position 2 mod 4 too),
    else None. Real uint16 data has non-zero words at both parities."""
    words = np.concatenate([c[: len(c) // 4 * 4] for c in chunks])
    if len(words) < MIN_WORDS_FOR_WIDTH_CHECK:
        return None
    words = words.reshape(-1, 4)
    if words[:, 1::2].any() or not words[:, 0::2].any():
        return None
    return 32 if words[:, 2].any() else 64


def window_starts(seed: int, stream: int, draw: tuple[int, ...], n_windows: int, high: int) -> np.ndarray:
    """`n_windows` start positions in [0, high), fixed by (seed, stream, *draw)."""
    rng = np.random.default_rng([seed, stream, *draw])
    return rng.integers(0, high, size=n_windows, dtype=np.int64)


class TokenFile:
    """A uint16 token file read through a memmap. With `vocab_size`, every window read is checked for ids
    past the vocabulary (the data check samples the file; a changed or foreign file may hold them anywhere)."""

    def __init__(self, path: str | Path, block_size: int, vocab_size: int | None = None):
        self.path, self.vocab_size = str(path), vocab_size
        n_tokens = len(np.memmap(self.path, dtype=np.uint16, mode="r"))
        self.block_size = block_size
        # A window needs block_size inputs plus one more token for the last target.
        self.n_starts = n_tokens - block_size
        if self.n_starts < 1:
            raise ValueError(
                f"{self.path}: {n_tokens} tokens is too few for block_size {block_size}"
                f" (need at least {block_size + 1})"
            )
        self._offsets = np.arange(block_size + 1, dtype=np.int64)

    def windows(self, starts: np.ndarray) -> torch.Tensor:
        """(len(starts), block_size + 1) int64 tokens; inputs are [:, :-1], targets [:, 1:]."""
        # Re-open the memmap for every batch: a long-lived one keeps every page it touched mapped,
        # so the process's memory grows to the size of the file over a long run.
        data = np.memmap(self.path, dtype=np.uint16, mode="r")
        rows = data[starts[:, None] + self._offsets]
        # On the host, where the rows already are: a max over a batch's few thousand uint16 ids costs
        # microseconds. On the device an id past the embedding is an IndexError naming nothing (CPU) or a
        # device-side assert that ends the process's CUDA context (GPU), too late to say where it came from.
        if self.vocab_size is not None and rows.max(initial=0) >= self.vocab_size:
            raise self._out_of_range(rows, starts)
        return torch.from_numpy(rows.astype(np.int64))

    def _out_of_range(self, rows: np.ndarray, starts: np.ndarray) -> DataError:
        row, column = np.unravel_index(np.argmax(rows >= self.vocab_size), rows.shape)
        position = int(starts[row]) + int(column)
        return DataError(
            f"{self.path} holds token id {int(rows[row, column])} at token {position:,} (byte {2 * position:,}), "
            f"but the model's vocab_size is {self.vocab_size}: the file was changed, or prepared with another "
            "tokenizer than meta.json says; prepare the dataset again"
        )


class Batches:
    """The batches one rank trains and evaluates on, moved to `device` (pinned + non_blocking on CUDA).

    The global batch of an iteration is its gradient_accumulation_steps micro-batches, micro-batch g
    drawn over the whole of train.bin with the key (seed, TRAIN_STREAM, (iter_num, 0, g)). Each of the
    world_size ranks runs `accum_steps` of them (global count / world_size): rank r's micro-step m is
    micro-batch r * accum_steps + m. With one worker, micro-step m is micro-batch m, the key single-worker
    runs always used: every worker count draws exactly what one worker draws, and a run can continue
    on another worker count without changing what it trains on. Dropout is keyed the same way
    (`dropout_seed`)."""

    def __init__(
        self,
        data_dir: str | Path,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        accum_steps: int | None = None,
        vocab_size: int | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of {world_size} workers")
        if accum_steps is None and world_size > 1:  # one worker's micro-batches start at 0 whatever their count
            raise ValueError("Batches needs accum_steps (micro-steps per worker) to place a rank's micro-batches")
        data_dir = Path(data_dir)
        # Held while this object lives: raygpt.prepare does not replace the files under a running run.
        self.read_lock = reading(data_dir)
        self.train = TokenFile(data_dir / "train.bin", block_size, vocab_size)
        self.eval_files = {"train": self.train, "val": TokenFile(data_dir / "val.bin", block_size, vocab_size)}
        self.batch_size, self.seed = batch_size, seed
        self.first_micro_batch = rank * (accum_steps or 0)  # this rank's first global micro-batch
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"

    def _to_device(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        if self.pin:
            # Pinned memory lets the copy run asynchronously while the GPU is still busy.
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def train_batch(self, iter_num: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's `micro_step`-th micro-batch of iteration `iter_num`."""
        # The 0 is where the rank stood when each rank read its own shard of the file: one worker's
        # keys, and so every single-worker run's batches, are those of that order.
        key = (iter_num, 0, self.first_micro_batch + micro_step)
        starts = window_starts(self.seed, TRAIN_STREAM, key, self.batch_size, self.train.n_starts)
        return self._to_device(self.train.windows(starts))

    def dropout_seed(self, iter_num: int, micro_step: int) -> int | None:
        """The seed of the dropout masks of this rank's `micro_step`: keyed by the global micro-batch, as
        its windows are, so a micro-batch gets the same masks on any worker count. Micro-batch 0's is the
        seed the loop set once per iteration before, so runs without accumulation keep their masks."""
        return hash((self.seed, iter_num, self.first_micro_batch + micro_step)) & 0x7FFF_FFFF

    def eval_batch(self, split: str, k: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The k-th of the fixed evaluation batches of `split` (the same windows at every eval), or
        several of them stacked into one, in the order given."""
        stream = EVAL_TRAIN_STREAM if split == "train" else EVAL_VAL_STREAM
        token_file = self.eval_files[split]
        ks = [k] if isinstance(k, int) else k
        starts = np.concatenate(
            [window_starts(self.seed, stream, (one,), self.batch_size, token_file.n_starts) for one in ks]
        )
        return self._to_device(token_file.windows(starts))


class NanoGPTOrderBatches(Batches):
    """nanoGPT's own sampling, for one worker: every batch (training and eval alike) is torch.randint
    on torch's global generator, drawn in the order nanoGPT's train.py draws them. With the same seed the
    run replays train.py's batches, so its losses can be compared number for number. It gives up some of
    what the default order guarantees: eval batches differ at each eval, it needs a single worker, and a
    resume is exact only because the checkpoint carries the stream's state (train.py's own resume is not)."""

    def _draw(self, token_file: TokenFile, n_batches: int) -> torch.Tensor:
        starts = torch.cat([torch.randint(token_file.n_starts, (self.batch_size,)) for _ in range(n_batches)])
        return token_file.windows(starts.numpy())

    def train_batch(self, iter_num: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._to_device(self._draw(self.train, 1))

    def dropout_seed(self, iter_num: int, micro_step: int) -> None:
        return None  # dropout draws from the same running stream as the batches, as in nanoGPT

    def eval_batch(self, split: str, k: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._to_device(self._draw(self.eval_files[split], 1 if isinstance(k, int) else len(k)))
