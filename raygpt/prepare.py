"""Prepare a dataset: text or parquet files -> DATA_DIR/NAME/{train,val}.bin + meta.json.

examples:
    python -m raygpt.prepare shakespeare_char [--input input.txt]   # characters, vocab 65
    python -m raygpt.prepare shakespeare [--input input.txt]        # GPT-2 BPE
    python -m raygpt.prepare openwebtext --input 'owt/*.parquet' [--text-column text]
    python -m raygpt.prepare corpus --name mycorpus --input 'docs/*.txt' [--one-doc-per-line]
    python -m raygpt.prepare openwebtext --input 'owt/*.parquet' --ray [--address HOST:PORT]  # on a cluster
    python -m raygpt.prepare shakespeare_char --data-dir s3://bucket/data   # straight to object storage

Tokens are uint16 (GPT-2's 50257 fit); meta.json says so. Inputs are checked before anything is
written; every output goes to a temporary file that is renamed into place (raygpt.storage.files), so a failed
or interrupted run leaves no partial train.bin and no temporary file, and a dataset folder it created
but could not fill is removed again. No pickle is written. meta.json records each .bin's size and
sha256, so a copy elsewhere can be verified. A URI --data-dir (s3://, gs://, any pyarrow filesystem) is
prepared in a local temporary folder and uploaded, meta.json last (raygpt.storage.uri).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import hashlib
import http.client
import json
import os
import signal
import stat
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from raygpt.core.tokenizer import EOT_TOKEN, MAX_VOCAB_SIZE, TOKEN_DTYPE, gpt2_encoding
from raygpt.errors import EXIT_INTERRUPTED, OneLineParser, RaygptError, one_line, refuse, run_cli
from raygpt.storage.datasets import dataset_uri, upload_dataset
from raygpt.storage.files import (
    DiskFullError,
    remove_empty_folders,
    remove_orphaned_temporaries,
    write_atomic,
    write_bytes_atomic,
    write_text_atomic,
)
from raygpt.storage.uri import check_destination, check_local_path, is_uri

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SETS = ("shakespeare_char", "shakespeare")
# A split needs one (input, target) pair to be trained or evaluated at all; the launcher checks it
# against the real block_size.
MIN_SPLIT_TOKENS = 2
# Below this, val loss is measured on a few dozen distinct windows (39 of nanoGPT's 256-character
# context for shakespeare_char): noisy, and larger contexts cannot be evaluated at all.
USEFUL_VAL_TOKENS = 10_000
OUTPUT_NAMES = ("train.bin", "val.bin", "meta.json", "input.txt")
MAX_THREADS = 1024  # more tokenizer threads than any machine has cores only costs memory
# Options of a corpus (the Shakespeare sets refuse them), by their argparse names.
CORPUS_OPTIONS = ("text_column", "one_doc_per_line", "val_fraction", "seed", "num_threads", "ray", "address")


class PrepareError(RaygptError):
    """Bad input to data preparation; the message is one line."""


# ---- where outputs go -------------------------------------------------------------------------------


def check_dataset_name(name: str) -> None:
    if name in ("", ".", "..") or "/" in name or os.sep in name or "\0" in name or "?" in name:
        raise PrepareError(f"dataset name {name!r} must be a plain folder name (no '/' or '?', not '.' or '..')")


def dataset_folder(data_dir: str | Path, name: str) -> Path:
    """DATA_DIR/NAME, after checking it can be made there (no part of it is a file), before any work."""
    check_dataset_name(name)
    dataset_dir = Path(data_dir).expanduser() / name
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
    kernel releases it when the process dies, however it dies."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PrepareError(
            f"another raygpt.prepare is writing {folder}; wait for it to finish, or choose another --name"
        ) from None
    try:
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


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


# ---- inputs -----------------------------------------------------------------------------------------


def check_input_file(path: Path, input_flag: str, glob_ok: bool = False) -> int:
    """The size of an input file; missing, a folder, a symlink loop or not a regular file: one line."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise PrepareError(f"input file {path} not found") from None
    except OSError as e:
        raise PrepareError(f"cannot read input {path}: {e.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        pattern = f", or a glob such as '{path}/*.txt'" if glob_ok else ""
        raise PrepareError(f"{input_flag} {path} is a folder; pass a file{pattern}")
    if not stat.S_ISREG(info.st_mode):
        raise PrepareError(f"{input_flag} {path} is not a regular file")
    return info.st_size


def decode_text(data: bytes, path: Path) -> str:
    """A text file's bytes as text: strict UTF-8 without NULs, a leading byte order mark dropped (an
    encoding marker, not a character of the text)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path} is not UTF-8 text (byte {e.start:,}); convert it, e.g. iconv -t utf-8") from None
    return check_no_nul(text, path)


def check_no_nul(text: str, path: Path) -> str:
    """Refuse text with a NUL character: UTF-16 without a byte order mark decodes as UTF-8 with a NUL after
    every ASCII character, and binary files are full of them; either would be trained on without a word."""
    if "\0" in text:
        raise PrepareError(
            f"{path} holds NUL characters: it is binary or UTF-16, not UTF-8 text; convert it "
            "(e.g. iconv -f utf-16 -t utf-8) or leave it out"
        )
    return text


def read_text_file(path: Path, input_flag: str) -> str:
    check_input_file(path, input_flag)
    try:
        text = decode_text(path.read_bytes(), path)
    except OSError as e:
        raise PrepareError(f"cannot read input {path}: {e.strerror}") from None
    if not text:
        raise PrepareError(f"input file {path} is empty")
    return text


def read_shakespeare(dataset_dir: Path, input_path: str | Path | None, input_flag: str) -> tuple[Path, str]:
    """The tiny Shakespeare text and its path: input_path, else downloaded once into the dataset folder."""
    if input_path is None:
        input_path = dataset_dir / "input.txt"
        if not os.path.lexists(input_path):
            download_shakespeare(dataset_dir, input_flag)
    input_path = Path(input_path)
    return input_path, read_text_file(input_path, input_flag)


def download_shakespeare(dataset_dir: Path, input_flag: str) -> None:
    print(f"downloading tiny Shakespeare from {SHAKESPEARE_URL}", file=sys.stderr)
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=60) as response:
            data = response.read()
    except (OSError, http.client.HTTPException) as e:
        raise PrepareError(
            f"cannot download tiny Shakespeare ({one_line(str(e)) or type(e).__name__}); "
            f"pass a local copy with {input_flag} FILE"
        ) from None
    with output_folder(dataset_dir):
        write_bytes_atomic(dataset_dir / "input.txt", data)


# ---- the two Shakespeare sets -----------------------------------------------------------------------


def prepare_shakespeare_char(
    data_dir: str | Path,
    input_path: str | Path | None = None,
    name: str = "shakespeare_char",
    input_flag: str = "--input",
) -> Path:
    """Character-level tiny Shakespeare: the first 90% of characters train, the rest val."""
    dataset_dir = dataset_folder(data_dir, name)
    path, text = read_shakespeare(dataset_dir, input_path, input_flag)
    chars = sorted(set(text))
    if len(chars) > MAX_VOCAB_SIZE:
        raise PrepareError(
            f"{path} has {len(chars):,} distinct characters, but character token ids are {TOKEN_DTYPE} (at most "
            f"{MAX_VOCAB_SIZE:,}); prepare it with GPT-2 BPE instead: python -m raygpt.prepare shakespeare"
        )
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    split = int(len(text) * 0.9)
    check_splits(name, split, len(text) - split, f"use a longer text than {path}")
    with output_folder(dataset_dir):
        meta = {"vocab_size": len(chars), "tokenizer": "char", "chars": chars}
        write_dataset(dataset_dir, meta, write_arrays(ids[:split], ids[split:]))
    print(f"{name}: vocab {len(chars)}, train {split:,} tokens, val {len(text) - split:,} tokens -> {dataset_dir}")
    return dataset_dir


def prepare_shakespeare_bpe(
    data_dir: str | Path,
    input_path: str | Path | None = None,
    name: str = "shakespeare",
    input_flag: str = "--input",
) -> Path:
    """GPT-2 BPE tiny Shakespeare: the 90/10 character split, each part encoded on its own."""
    dataset_dir = dataset_folder(data_dir, name)
    path, text = read_shakespeare(dataset_dir, input_path, input_flag)
    split = int(len(text) * 0.9)
    encoding = gpt2_encoding()
    train_ids = np.array(encoding.encode_ordinary(text[:split]), dtype=np.uint16)
    val_ids = np.array(encoding.encode_ordinary(text[split:]), dtype=np.uint16)
    check_splits(name, len(train_ids), len(val_ids), f"use a longer text than {path}")
    with output_folder(dataset_dir):
        write_dataset(
            dataset_dir, {"vocab_size": encoding.n_vocab, "tokenizer": "gpt2"}, write_arrays(train_ids, val_ids)
        )
    print(f"{name}: GPT-2 BPE, train {len(train_ids):,} tokens, val {len(val_ids):,} tokens -> {dataset_dir}")
    return dataset_dir


# ---- large corpora: streamed, tokenized in parallel, bounded memory ----------------------------------


def expand_inputs(pattern: str | Path | None, input_flag: str = "--input") -> list[Path]:
    if pattern is None:
        raise PrepareError(
            f"no {input_flag} given: point it at your text or parquet files, e.g. {input_flag} 'owt/*.parquet'"
        )
    paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(str(pattern))))
    if not paths:
        raise PrepareError(f"no files match {input_flag} {pattern}")
    return paths


def is_text_type(arrow_type) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        return is_text_type(arrow_type.value_type)
    string_view = getattr(pa.types, "is_string_view", lambda _: False)
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or string_view(arrow_type)


def check_inputs(paths: list[Path], text_column: str, input_flag: str) -> int:
    """Refuse, before anything is written, inputs that cannot be read: each must be a regular file, and a
    parquet file must open and hold `text_column` as text. Returns the rows of all parquet files plus the
    bytes of all text files: what the ETA counts down."""
    total = 0
    for path in paths:
        size = check_input_file(path, input_flag, glob_ok=True)
        if path.suffix != ".parquet":
            total += size
            continue
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            with pq.ParquetFile(path) as parquet:
                schema, rows = parquet.schema_arrow, parquet.metadata.num_rows
        except (pa.ArrowException, OSError) as e:
            raise PrepareError(f"{path} is not a readable parquet file ({one_line(str(e))})") from None
        columns = ", ".join(schema.names)
        if text_column not in schema.names:
            raise PrepareError(
                f"{path} has no column {text_column!r} (columns: {columns}); choose one with --text-column"
            )
        column_type = schema.field(text_column).type
        if not is_text_type(column_type):
            raise PrepareError(
                f"{path}: column {text_column!r} holds {column_type}, not text (columns: {columns}); "
                "choose a text column with --text-column"
            )
        total += rows
    return total


def iter_documents(
    paths: list[Path], text_column: str, one_doc_per_line: bool, batch_rows: int = 1024
) -> Iterator[tuple[list[str], int]]:
    """Batches of documents with the input bytes (text) or rows (parquet) they used, for progress."""
    for path in paths:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                with pq.ParquetFile(path) as parquet:
                    for batch in parquet.iter_batches(batch_size=batch_rows, columns=[text_column]):
                        yield [doc for doc in batch.column(0).to_pylist() if doc], batch.num_rows
            except (pa.ArrowException, OSError) as e:
                raise PrepareError(f"cannot read {path}: {one_line(str(e))}") from None
            continue
        yield from iter_text_documents(path, one_doc_per_line, batch_rows)


def iter_text_documents(path: Path, one_doc_per_line: bool, batch_rows: int) -> Iterator[tuple[list[str], int]]:
    """iter_documents for one text file, read as decode_text reads it (streamed: a corpus file may be
    larger than memory)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            if not one_doc_per_line:
                text = check_no_nul(f.read(), path)
                yield ([text] if text else []), len(text.encode("utf-8"))
                return
            docs, size = [], 0
            for line in f:
                check_no_nul(line, path)
                size += len(line.encode("utf-8"))
                if line.strip():
                    docs.append(line.rstrip("\n"))
                if len(docs) == batch_rows:
                    yield docs, size
                    docs, size = [], 0
            if docs or size:
                yield docs, size
    except UnicodeDecodeError:
        raise PrepareError(f"{path} is not UTF-8 text; convert it (e.g. iconv -t utf-8) or leave it out") from None
    except OSError as e:
        raise PrepareError(f"cannot read {path}: {e.strerror}") from None


@contextlib.contextmanager
def interrupts_between_batches() -> Iterator[Callable[[], None]]:
    """Ctrl-C as a KeyboardInterrupt raised by the check this yields, called between batches. Raised
    anywhere, it can land inside the tokenizer's thread pool while that holds one of its locks, and the
    process then hangs with its temporary files. A second Ctrl-C interrupts at once."""
    pending = []

    def defer(signum, frame):
        pending.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def check() -> None:
        if pending:
            raise KeyboardInterrupt

    in_charge = threading.current_thread() is threading.main_thread()
    if not in_charge or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield check  # signals are not ours to handle here
        return
    signal.signal(signal.SIGINT, defer)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    check()  # a Ctrl-C after the last batch's check


def tokenize_documents(
    name: str,
    paths: list[Path],
    outputs: dict[str, BinaryIO],
    work: int,
    text_column: str,
    one_doc_per_line: bool,
    val_fraction: float,
    rng: np.random.Generator,
    num_threads: int,
) -> tuple[int, dict[str, int]]:
    """Write each document's GPT-2 tokens and an EOT to outputs['val'] with probability val_fraction (drawn
    from rng), else to outputs['train']; returns the documents and the tokens of each split."""
    encoding = gpt2_encoding()
    counts = {"train": 0, "val": 0}
    docs_done = work_done = 0
    start = last_print = time.time()
    with interrupts_between_batches() as check_interrupt:
        for docs, work_in_batch in iter_documents(paths, text_column, one_doc_per_line):
            check_interrupt()
            to_val = rng.random(len(docs)) < val_fraction
            # tiktoken's batch encoder runs its Rust core on several threads at once.
            for doc_ids, is_val in zip(encoding.encode_ordinary_batch(docs, num_threads=num_threads), to_val):
                split = "val" if is_val else "train"
                ids = np.array(doc_ids + [EOT_TOKEN], dtype=np.uint16)
                outputs[split].write(ids.tobytes())
                counts[split] += len(ids)
            docs_done += len(docs)
            work_done += work_in_batch
            now = time.time()
            if now - last_print >= 2.0:
                last_print = now
                elapsed = now - start
                eta = (work - work_done) * elapsed / max(work_done, 1)
                print(
                    f"{name}: {docs_done:,} docs ({docs_done / elapsed:,.0f}/s), "
                    f"{(counts['train'] + counts['val']) / elapsed:,.0f} tokens/s, "
                    f"{100 * work_done / max(work, 1):.1f}%, eta {eta:,.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
    return docs_done, counts


@contextlib.contextmanager
def ray_connection(use_ray: bool, address: str | None) -> Iterator[None]:
    """Connected to Ray for the block when use_ray (an existing connection is kept as it is)."""
    if not use_ray:
        yield
        return
    import ray

    from raygpt.prep.corpus_ray import connect_ray

    connected_here = connect_ray(address)
    try:
        yield
    finally:
        if connected_here:
            ray.shutdown()


def prepare_corpus(
    name: str,
    data_dir: str | Path,
    input_path: str | Path | None,
    text_column: str = "text",
    one_doc_per_line: bool = False,
    val_fraction: float = 0.0005,
    seed: int = 2357,
    num_threads: int | None = None,
    input_flag: str = "--input",
    use_ray: bool = False,
    address: str | None = None,
) -> Path:
    """GPT-2 BPE over many documents, EOT after each, each document to val with probability val_fraction.
    use_ray tokenizes on the Ray cluster at `address` (raygpt.prep.corpus_ray), with the same outputs."""
    if not 0.0 < val_fraction < 1.0:
        raise PrepareError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if seed < 0:
        raise PrepareError(f"--seed must not be negative, got {seed}")
    if num_threads is not None and not 1 <= num_threads <= MAX_THREADS:
        raise PrepareError(f"--num-threads must be from 1 to {MAX_THREADS}, got {num_threads}")
    paths = expand_inputs(input_path, input_flag)
    work = check_inputs(paths, text_column, input_flag)
    dataset_dir = dataset_folder(data_dir, name)
    # Load the tokenizer and numpy.random before any output exists: a Ctrl-C that lands in an extension
    # module's import can be swallowed there (numpy.random's Cython init does), and the run would go on.
    encoding, rng = gpt2_encoding(), np.random.default_rng(seed)
    start = time.time()
    summary: dict = {}

    def write_splits(train_file: BinaryIO, val_file: BinaryIO) -> None:
        # Runs inside write_dataset's two write_atomic calls: a refusal here leaves neither file nor a temporary.
        outputs = {"train": train_file, "val": val_file}
        reading = (name, paths, outputs, work, text_column, one_doc_per_line, val_fraction, rng)
        if use_ray:
            from raygpt.prep.corpus_ray import tokenize_documents_on_ray

            docs, counts = tokenize_documents_on_ray(*reading)
        else:
            docs, counts = tokenize_documents(*reading, num_threads or os.cpu_count() or 1)
        if docs == 0:
            raise PrepareError(f"no documents found in {input_flag} {input_path}")
        if counts["val"] == 0:
            raise PrepareError(f"no document was drawn for val from {docs} documents; raise --val-fraction")
        if counts["train"] == 0:
            raise PrepareError(f"every one of the {docs} documents was drawn for val; lower --val-fraction")
        check_splits(name, counts["train"], counts["val"], "raise --val-fraction or add documents")
        summary.update(docs=docs, **counts)

    with ray_connection(use_ray, address), output_folder(dataset_dir):
        write_dataset(dataset_dir, {"vocab_size": encoding.n_vocab, "tokenizer": "gpt2"}, write_splits)
    print(
        f"{name}: {summary['docs']:,} docs, train {summary['train']:,} tokens, val {summary['val']:,} tokens "
        f"in {time.time() - start:.1f}s -> {dataset_dir}"
    )
    return dataset_dir


def prepare_dataset(
    name: str,
    data_dir: str | Path = "data",
    input_path: str | Path | None = None,
    input_flag: str = "--input",
    output_name: str | None = None,
    **corpus_options,
) -> Path | str:
    """Prepare a dataset by name into DATA_DIR/(output_name or name): the two Shakespeare sets, or a
    corpus of text/parquet files. `input_flag` is how the caller's users pass input_path, for hints.
    A URI data_dir returns the dataset's URI instead of its folder."""
    check_places(data_dir, input_path, input_flag)
    output_name = name if output_name is None else output_name
    if is_uri(data_dir):
        return prepare_to_uri(name, str(data_dir), input_path, input_flag, output_name, **corpus_options)
    if name == "shakespeare_char":
        return prepare_shakespeare_char(data_dir, input_path, output_name, input_flag)
    if name == "shakespeare":
        return prepare_shakespeare_bpe(data_dir, input_path, output_name, input_flag)
    return prepare_corpus(output_name, data_dir, input_path, input_flag=input_flag, **corpus_options)


def check_places(data_dir: str | Path, input_path: str | Path | None, input_flag: str) -> None:
    """Refuse, before any work, an output place that is empty or a URI with a slash missing (s3:/bucket
    would be a local folder named 's3:'), and an input that is a URL: inputs are local files."""
    if not str(data_dir):
        raise PrepareError("--data-dir is empty: give the folder (or URI) the dataset goes to, e.g. --data-dir data")
    check_local_path(data_dir, "--data-dir")
    if input_path is not None and (is_uri(input_path) or str(input_path).startswith(("http:/", "https:/"))):
        raise PrepareError(
            f"{input_flag} {input_path} is a URL, but inputs are local files: download it first "
            f"(e.g. curl -o FILE URL) and pass {input_flag} FILE"
        )


def prepare_to_uri(
    name: str, data_dir: str, input_path, input_flag: str, output_name: str | None, **corpus_options
) -> str:
    """Prepare into a local temporary folder (under $TMPDIR: it needs room for the outputs), then upload."""
    check_dataset_name(output_name)
    uri = dataset_uri(data_dir, output_name)
    check_destination(uri)  # before the work: a missing bucket is found in a second, not after an hour
    with tempfile.TemporaryDirectory(prefix="raygpt-prepare-") as tmp:
        local = prepare_dataset(name, tmp, input_path, input_flag, output_name, **corpus_options)
        upload_dataset(local, uri)
    return uri


def build_parser() -> argparse.ArgumentParser:
    description, _, details = __doc__.partition("\n\n")
    parser = OneLineParser(
        prog="python -m raygpt.prepare",
        description=description,
        epilog=details,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "dataset",
        help="shakespeare_char (characters), shakespeare (GPT-2 BPE), or a name of your own for a "
        "corpus of --input files (GPT-2 BPE)",
    )
    parser.add_argument(
        "--input",
        metavar="FILE_OR_GLOB",
        help="a text file for the Shakespeare sets (default: download tiny Shakespeare), or a glob "
        "of .txt/.parquet files for a corpus (required)",
    )
    parser.add_argument(
        "--data-dir",
        default="data",
        metavar="DIR",
        help="outputs go to DIR/NAME; DIR may be a URI such as s3://bucket/data (default: %(default)s)",
    )
    parser.add_argument("--name", help="output folder name (default: the dataset name)")
    parser.add_argument(
        "--text-column", default="text", metavar="COLUMN", help="parquet column of the documents (default: %(default)s)"
    )
    parser.add_argument(
        "--one-doc-per-line",
        action="store_true",
        help="each line of a corpus text file is a document (default: each file is one)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.0005,
        metavar="F",
        help="share of a corpus's documents drawn for val (default: %(default)s, nanoGPT's for OpenWebText)",
    )
    parser.add_argument(
        "--seed", type=int, default=2357, help="seed of a corpus's train/val draw (default: %(default)s, nanoGPT's)"
    )
    parser.add_argument(
        "--num-threads",
        type=int,
        metavar="N",
        help=f"tokenizer threads, 1 to {MAX_THREADS} (default: one per CPU, {os.cpu_count()} here)",
    )
    parser.add_argument(
        "--ray",
        action="store_true",
        help="tokenize a corpus with Ray tasks across the cluster (same outputs, byte for byte)",
    )
    parser.add_argument(
        "--address",
        metavar="HOST:PORT",
        help="the Ray cluster for --ray (default: RAY_ADDRESS, else a cluster started here with `ray start`, "
        "else a local Ray)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    corpus_options = {dest: getattr(args, dest) for dest in CORPUS_OPTIONS}
    if args.dataset in SHAKESPEARE_SETS:
        # The Shakespeare sets split 90/10 by characters, as nanoGPT's do: a corpus option would be ignored.
        given = [
            f"--{dest.replace('_', '-')}" for dest in CORPUS_OPTIONS if getattr(args, dest) != parser.get_default(dest)
        ]
        if given:
            return refuse(PrepareError(f"{', '.join(given)} apply to corpus datasets, not {args.dataset} (split "
                                       "90/10 by characters, as nanoGPT's): leave them out"))  # fmt: skip
        corpus_options = {}
    elif args.address and not args.ray:
        return refuse(PrepareError("--address is the Ray cluster for --ray; add --ray"))
    corpus_options["use_ray"] = corpus_options.pop("ray", False)

    def prepare() -> int:
        prepare_dataset(args.dataset, args.data_dir, args.input, output_name=args.name, **corpus_options)
        return 0

    try:
        return run_cli(prepare)
    except KeyboardInterrupt:
        print("interrupted: no partial output was left; run the same command again", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
