"""`python -m raygpt.prepare DATASET [options]`: text or parquet -> data/<name>/{train,val}.bin + meta.json.

    python -m raygpt.prepare shakespeare_char [--input input.txt]   # characters, vocab 65
    python -m raygpt.prepare shakespeare [--input input.txt]        # GPT-2 BPE
    python -m raygpt.prepare openwebtext --input 'owt/*.parquet' [--text-column text]
    python -m raygpt.prepare corpus --name mycorpus --input 'docs/*.txt' [--one-doc-per-line]

Tokens are uint16 (GPT-2's 50257 fit). Outputs are written to temporary files and renamed at the end,
so an interrupted run never leaves a train.bin that looks complete. No pickle is written.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from raygpt.errors import RaygptError
from raygpt.tokenizer import EOT_TOKEN, gpt2_encoding

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


class PrepareError(RaygptError):
    """Bad input to data preparation; the message is one line."""


def write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)


def read_shakespeare(dataset_dir: Path, input_path: str | Path | None) -> str:
    """The tiny Shakespeare text: from input_path, else downloaded once into the dataset folder."""
    if input_path is None:
        input_path = dataset_dir / "input.txt"
        if not input_path.exists():
            print(f"downloading tiny Shakespeare from {SHAKESPEARE_URL}", file=sys.stderr)
            try:
                with urllib.request.urlopen(SHAKESPEARE_URL, timeout=60) as response:
                    write_atomic(input_path, response.read())
            except OSError as e:
                raise PrepareError(
                    f"cannot download tiny Shakespeare ({e}); pass a local copy with --input FILE"
                ) from None
    input_path = Path(input_path)
    if not input_path.is_file():
        raise PrepareError(f"input file {input_path} not found")
    text = input_path.read_text(encoding="utf-8")
    if not text:
        raise PrepareError(f"input file {input_path} is empty")
    return text


def prepare_shakespeare_char(
    data_dir: str | Path, input_path: str | Path | None = None, name: str = "shakespeare_char"
) -> Path:
    """Character-level tiny Shakespeare: the first 90% of characters train, the rest val."""
    dataset_dir = Path(data_dir) / name
    dataset_dir.mkdir(parents=True, exist_ok=True)
    text = read_shakespeare(dataset_dir, input_path)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    split = int(len(text) * 0.9)
    write_atomic(dataset_dir / "train.bin", ids[:split].tobytes())
    write_atomic(dataset_dir / "val.bin", ids[split:].tobytes())
    write_atomic(
        dataset_dir / "meta.json",
        json.dumps({"vocab_size": len(chars), "tokenizer": "char", "chars": chars}, ensure_ascii=False),
    )
    print(f"{name}: vocab {len(chars)}, train {split:,} tokens, val {len(text) - split:,} tokens -> {dataset_dir}")
    return dataset_dir


def prepare_shakespeare_bpe(
    data_dir: str | Path, input_path: str | Path | None = None, name: str = "shakespeare"
) -> Path:
    """GPT-2 BPE tiny Shakespeare: the 90/10 character split, each part encoded on its own."""
    dataset_dir = Path(data_dir) / name
    dataset_dir.mkdir(parents=True, exist_ok=True)
    text = read_shakespeare(dataset_dir, input_path)
    split = int(len(text) * 0.9)
    encoding = gpt2_encoding()
    train_ids = np.array(encoding.encode_ordinary(text[:split]), dtype=np.uint16)
    val_ids = np.array(encoding.encode_ordinary(text[split:]), dtype=np.uint16)
    write_atomic(dataset_dir / "train.bin", train_ids.tobytes())
    write_atomic(dataset_dir / "val.bin", val_ids.tobytes())
    write_atomic(dataset_dir / "meta.json", json.dumps({"vocab_size": encoding.n_vocab, "tokenizer": "gpt2"}))
    print(f"{name}: GPT-2 BPE, train {len(train_ids):,} tokens, val {len(val_ids):,} tokens -> {dataset_dir}")
    return dataset_dir


# ---- large corpora: streamed, tokenized in parallel, bounded memory ----------------------------------


def expand_inputs(pattern: str | Path | None) -> list[Path]:
    if pattern is None:
        raise PrepareError("no --input given: point it at your text or parquet files, e.g. --input 'owt/*.parquet'")
    paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(str(pattern))))
    if not paths:
        raise PrepareError(f"no files match --input {pattern}")
    return paths


def iter_documents(
    paths: list[Path], text_column: str, one_doc_per_line: bool, batch_rows: int = 1024
) -> Iterator[tuple[list[str], int]]:
    """Batches of documents with the input bytes (text) or rows (parquet) they used, for progress."""
    for path in paths:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(path)
            if text_column not in parquet.schema_arrow.names:
                raise PrepareError(
                    f"{path} has no column {text_column!r} (columns: "
                    f"{', '.join(parquet.schema_arrow.names)}); choose one with --text-column"
                )
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=[text_column]):
                docs = [doc for doc in batch.column(0).to_pylist() if doc]
                yield docs, batch.num_rows
        else:
            with open(path, encoding="utf-8") as f:
                if not one_doc_per_line:
                    text = f.read()
                    yield ([text] if text else []), len(text.encode("utf-8"))
                    continue
                docs, size = [], 0
                for line in f:
                    size += len(line.encode("utf-8"))
                    if line.strip():
                        docs.append(line.rstrip("\n"))
                    if len(docs) == batch_rows:
                        yield docs, size
                        docs, size = [], 0
                if docs or size:
                    yield docs, size


def total_work(paths: list[Path]) -> int:
    """Rows of all parquet files plus bytes of all text files: what the ETA counts down."""
    total = 0
    for path in paths:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(path).metadata.num_rows
        else:
            total += path.stat().st_size
    return total


def prepare_corpus(
    name: str,
    data_dir: str | Path,
    input_path: str | Path | None,
    text_column: str = "text",
    one_doc_per_line: bool = False,
    val_fraction: float = 0.0005,
    seed: int = 2357,
    num_threads: int | None = None,
) -> Path:
    """GPT-2 BPE over many documents, EOT after each, each document to val with probability val_fraction."""
    paths = expand_inputs(input_path)
    if not 0.0 < val_fraction < 1.0:
        raise PrepareError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    dataset_dir = Path(data_dir) / name
    dataset_dir.mkdir(parents=True, exist_ok=True)
    encoding = gpt2_encoding()
    num_threads = num_threads or os.cpu_count() or 1
    rng = np.random.default_rng(seed)
    work = total_work(paths)
    outputs = {split: open(dataset_dir / f"{split}.bin.tmp", "wb") for split in ("train", "val")}
    counts = {"train": 0, "val": 0}
    docs_done = work_done = 0
    start = last_print = time.time()
    try:
        for docs, work_in_batch in iter_documents(paths, text_column, one_doc_per_line):
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
    finally:
        for f in outputs.values():
            f.close()
    if counts["train"] == 0:
        raise PrepareError(f"no documents found in --input {input_path}")
    if counts["val"] == 0:
        raise PrepareError(f"no document was drawn for val from {docs_done} documents; raise --val-fraction")
    for split in ("train", "val"):
        os.replace(dataset_dir / f"{split}.bin.tmp", dataset_dir / f"{split}.bin")
    write_atomic(dataset_dir / "meta.json", json.dumps({"vocab_size": encoding.n_vocab, "tokenizer": "gpt2"}))
    print(
        f"{name}: {docs_done:,} docs, train {counts['train']:,} tokens, val {counts['val']:,} tokens "
        f"in {time.time() - start:.1f}s -> {dataset_dir}"
    )
    return dataset_dir


def prepare_dataset(
    name: str, data_dir: str | Path = "data", input_path: str | Path | None = None, **corpus_options
) -> Path:
    """Prepare a dataset by name: the two Shakespeare sets, or a corpus of text/parquet files."""
    if name == "shakespeare_char":
        return prepare_shakespeare_char(data_dir, input_path)
    if name == "shakespeare":
        return prepare_shakespeare_bpe(data_dir, input_path)
    return prepare_corpus(name, data_dir, input_path, **corpus_options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raygpt.prepare",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("dataset", help="shakespeare_char, shakespeare, openwebtext, or a corpus name")
    parser.add_argument("--input", help="input file, or a glob of text/parquet files for a corpus")
    parser.add_argument("--data-dir", default="data", help="outputs go to DATA_DIR/NAME (default: data)")
    parser.add_argument("--name", help="output folder name (default: the dataset name)")
    parser.add_argument("--text-column", default="text", help="parquet column holding the documents")
    parser.add_argument("--one-doc-per-line", action="store_true", help="text files hold one document per line")
    parser.add_argument("--val-fraction", type=float, default=0.0005, help="share of documents that go to val")
    parser.add_argument("--seed", type=int, default=2357, help="seed of the train/val draw")
    parser.add_argument("--num-threads", type=int, default=None, help="tokenizer threads (default: all CPUs)")
    args = parser.parse_args(argv)
    name = args.name or args.dataset
    try:
        if args.dataset == "shakespeare_char":
            prepare_shakespeare_char(args.data_dir, args.input, name)
        elif args.dataset == "shakespeare":
            prepare_shakespeare_bpe(args.data_dir, args.input, name)
        else:
            prepare_corpus(
                name,
                args.data_dir,
                args.input,
                args.text_column,
                args.one_doc_per_line,
                args.val_fraction,
                args.seed,
                args.num_threads,
            )
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
