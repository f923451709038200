"""A corpus of text or parquet files -> GPT-2 BPE tokens in train.bin and val.bin: the input checks, the
documents, and one tokenising loop.

Documents are read in order (reading is far faster than BPE) and each one's split is drawn from a seeded
rng, batch by batch, as it is read. The documents are tokenised by an in-order mapper: tiktoken's batch
encoder on a pool of local threads, or (--ray) Ray tasks across a cluster, a bounded window of them in
flight, where no node needs the input files. Either way the results are written strictly in reading
order, so train.bin, val.bin and meta.json are byte for byte the same.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import itertools
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from raygpt.core.tokenizer import EOT_TOKEN, gpt2_encoding
from raygpt.errors import one_line
from raygpt.prep.output import PrepareError, check_splits, dataset_folder, output_folder, write_dataset
from raygpt.storage.datasets import Meter
from raygpt.storage.files import NulCharacterError, check_no_nul, decode_text

# The corpus options' defaults (the command line's too): nanoGPT's for OpenWebText.
TEXT_COLUMN = "text"
VAL_FRACTION = 0.0005
SEED = 2357
MAX_THREADS = 1024  # more tokenizer threads than any machine has cores only costs memory
# Characters of text per Ray task: large enough that a task's overhead is small next to its BPE work,
# small enough that a few in flight per CPU keep every core busy and the driver's memory bounded.
TASK_CHARS = 4_000_000
TASKS_PER_CPU = 2
PROGRESS_INTERVAL_S = 2.0
NUL_TEXT = (
    "holds NUL characters: it is binary or UTF-16, not UTF-8 text; convert it (e.g. iconv -f utf-16 -t utf-8) "
    "or leave it out"
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


def read_text_file(path: Path, input_flag: str) -> str:
    """A whole input file as text (raygpt.storage.files.decode_text: strict UTF-8, no NUL)."""
    check_input_file(path, input_flag)
    try:
        text = decode_text(path.read_bytes())
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path} is not UTF-8 text (byte {e.start:,}); convert it, e.g. iconv -t utf-8") from None
    except NulCharacterError:
        raise PrepareError(f"{path} {NUL_TEXT}") from None
    except OSError as e:
        raise PrepareError(f"cannot read input {path}: {e.strerror}") from None
    if not text:
        raise PrepareError(f"input file {path} is empty")
    return text


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
    """iter_documents for one text file, read as read_text_file reads it (streamed: a corpus file may be
    larger than memory)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            if not one_doc_per_line:
                text = check_no_nul(f.read())
                yield ([text] if text else []), len(text.encode("utf-8"))
                return
            docs, size = [], 0
            for line in f:
                check_no_nul(line)
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
    except NulCharacterError:
        raise PrepareError(f"{path} {NUL_TEXT}") from None
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


# ---- the tokenising loop ------------------------------------------------------------------------------


class Group(NamedTuple):
    """Documents tokenised together, each one's val draw, and the input bytes or rows they used."""

    docs: list[str]
    to_val: np.ndarray
    work: int


def document_groups(
    batches: Iterator[tuple[list[str], int]], val_fraction: float, rng: np.random.Generator, group_chars: int
) -> Iterator[Group]:
    """iter_documents' batches gathered into groups of at least group_chars characters (0: one batch
    each), with each document's val draw taken batch by batch in reading order: the draws, and so the
    outputs, do not depend on the grouping."""
    docs, draws, work, chars = [], [], 0, 0
    for batch, work_in_batch in batches:
        draws.append(rng.random(len(batch)) < val_fraction)
        docs.extend(batch)
        work += work_in_batch
        chars += sum(len(doc) for doc in batch)
        if chars >= group_chars:
            yield Group(docs, np.concatenate(draws), work)
            docs, draws, work, chars = [], [], 0, 0
    if docs or work:
        yield Group(docs, np.concatenate(draws) if draws else np.zeros(0, dtype=bool), work)


def token_arrays(encoded: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Every document's tokens and an EOT, concatenated, and each document's token count."""
    encoded = [ids + [EOT_TOKEN] for ids in encoded]
    lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
    tokens = np.array(list(itertools.chain.from_iterable(encoded)), dtype=np.uint16)
    return tokens, lengths


def tokenize_group(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A Ray task's work. One CPU per task: a plain loop, as tiktoken's batch encoder costs a thread pool
    hand-off per document."""
    encoding = gpt2_encoding()
    return token_arrays([encoding.encode_ordinary(doc) for doc in docs])


def on_threads(num_threads: int) -> Callable[[Iterator[Group]], Iterator[tuple[Group, tuple]]]:
    """The local mapper: tiktoken's batch encoder runs its Rust core on num_threads threads at once."""
    encoding = gpt2_encoding()

    def tokenize(groups: Iterator[Group]) -> Iterator[tuple[Group, tuple]]:
        for group in groups:
            yield group, token_arrays(encoding.encode_ordinary_batch(group.docs, num_threads=num_threads))

    return tokenize


def on_ray(groups: Iterator[Group]) -> Iterator[tuple[Group, tuple]]:
    """The Ray mapper: a task per group, at most TASKS_PER_CPU per cluster CPU in flight, results in order."""
    import ray

    tokenize = ray.remote(num_cpus=1)(tokenize_group)
    max_in_flight = max(2, TASKS_PER_CPU * int(ray.cluster_resources().get("CPU", 1)))
    in_flight: collections.deque = collections.deque()
    for group in groups:
        in_flight.append((group, tokenize.remote(group.docs) if group.docs else ray.put(tokenize_group([]))))
        while len(in_flight) >= max_in_flight:
            yield task_result(*in_flight.popleft())
    while in_flight:
        yield task_result(*in_flight.popleft())


def task_result(group: Group, result) -> tuple[Group, tuple]:
    import ray

    try:
        return group, ray.get(result)
    except ray.exceptions.RayError as e:  # e.g. a node that cannot load GPT-2's BPE files
        cause = getattr(e, "cause", None) or e  # a task's own exception, not Ray's traceback header
        raise PrepareError(f"a Ray tokenizer task failed ({one_line(str(cause))}); run without --ray") from None


def write_group(tokens: np.ndarray, lengths: np.ndarray, to_val: np.ndarray, outputs: dict[str, BinaryIO]) -> dict:
    """A group's documents to their splits, in document order; returns the tokens written to each."""
    is_val = np.repeat(to_val, lengths)
    train, val = tokens[~is_val], tokens[is_val]
    outputs["train"].write(train.tobytes())
    outputs["val"].write(val.tobytes())
    return {"train": len(train), "val": len(val)}


def checked(groups: Iterator[Group], check_interrupt: Callable[[], None]) -> Iterator[Group]:
    for group in groups:
        check_interrupt()  # before a group is handed to the tokenizer
        yield group


def tokenize_documents(
    name: str,
    paths: list[Path],
    outputs: dict[str, BinaryIO],
    work: int,
    reading: tuple[str, bool, float, np.random.Generator],
    use_ray: bool,
    num_threads: int,
) -> tuple[int, dict[str, int]]:
    """Write each document's GPT-2 tokens and an EOT to outputs['val'] with probability val_fraction (drawn
    from rng), else to outputs['train']; returns the documents and the tokens of each split. reading is
    (text_column, one_doc_per_line, val_fraction, rng); use_ray tokenizes with Ray tasks, else on
    num_threads local threads."""
    text_column, one_doc_per_line, val_fraction, rng = reading
    tokenize, group_chars, suffix = (on_ray, TASK_CHARS, " on Ray") if use_ray else (on_threads(num_threads), 0, "")
    counts = {"train": 0, "val": 0}
    docs_done = 0

    def line(meter: Meter) -> str:
        seconds = meter.seconds()
        return (
            f"{name}: {docs_done:,} docs ({docs_done / seconds:,.0f}/s), "
            f"{(counts['train'] + counts['val']) / seconds:,.0f} tokens/s{suffix}, "
            f"{100 * meter.done / max(meter.total, 1):.1f}%, eta {meter.eta():,.0f}s"
        )

    meter = Meter(work, line, lambda text: print(text, file=sys.stderr, flush=True), PROGRESS_INTERVAL_S)
    with interrupts_between_batches() as check_interrupt:
        groups = document_groups(iter_documents(paths, text_column, one_doc_per_line), val_fraction, rng, group_chars)
        for group, (tokens, lengths) in tokenize(checked(groups, check_interrupt)):
            for split, written in write_group(tokens, lengths, group.to_val, outputs).items():
                counts[split] += written
            docs_done += len(group.to_val)
            meter.add(group.work)
            check_interrupt()
    return docs_done, counts


@contextlib.contextmanager
def ray_connection(use_ray: bool, address: str | None) -> Iterator[None]:
    """Connected to Ray for the block when use_ray: this process's connection if it has one (kept as it
    is), else `address` / RAY_ADDRESS joined or a local Ray started, as the launcher does, and left after."""
    if not use_ray:
        yield
        return
    import ray

    if ray.is_initialized():
        yield
        return
    from raygpt.driver.ray_cluster import connect  # prep's one way to Ray

    connect(address)
    try:
        yield
    finally:
        ray.shutdown()


def prepare_corpus(
    name: str,
    data_dir: str | Path,
    input_path: str | Path | None,
    text_column: str = TEXT_COLUMN,
    one_doc_per_line: bool = False,
    val_fraction: float = VAL_FRACTION,
    seed: int = SEED,
    num_threads: int | None = None,
    input_flag: str = "--input",
    use_ray: bool = False,
    address: str | None = None,
) -> Path:
    """GPT-2 BPE over many documents, EOT after each, each document to val with probability val_fraction.
    use_ray tokenizes on the Ray cluster at `address`, with the same outputs."""
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
        reading = (text_column, one_doc_per_line, val_fraction, rng)
        threads = num_threads or os.cpu_count() or 1
        docs, counts = tokenize_documents(name, paths, outputs, work, reading, use_ray, threads)
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
