"""The two tiny Shakespeare sets, as nanoGPT prepares them: shakespeare_char (characters) and shakespeare
(GPT-2 BPE), each split 90/10 by characters; the text is a given file or downloaded once."""

from __future__ import annotations

import http.client
import os
import sys
import urllib.request
from pathlib import Path

import numpy as np

from raygpt.core.tokenizer import MAX_VOCAB_SIZE, TOKEN_DTYPE, gpt2_encoding
from raygpt.errors import one_line
from raygpt.prep.corpus import read_text_file
from raygpt.prep.output import PrepareError, check_splits, dataset_folder, output_folder, write_arrays, write_dataset
from raygpt.storage.files import write_bytes_atomic

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SETS = ("shakespeare_char", "shakespeare")


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
    encoding = gpt2_encoding()  # before the corpus is downloaded: without the BPE files nothing is written
    path, text = read_shakespeare(dataset_dir, input_path, input_flag)
    split = int(len(text) * 0.9)
    train_ids = np.array(encoding.encode_ordinary(text[:split]), dtype=np.uint16)
    val_ids = np.array(encoding.encode_ordinary(text[split:]), dtype=np.uint16)
    check_splits(name, len(train_ids), len(val_ids), f"use a longer text than {path}")
    with output_folder(dataset_dir):
        write_dataset(
            dataset_dir, {"vocab_size": encoding.n_vocab, "tokenizer": "gpt2"}, write_arrays(train_ids, val_ids)
        )
    print(f"{name}: GPT-2 BPE, train {len(train_ids):,} tokens, val {len(val_ids):,} tokens -> {dataset_dir}")
    return dataset_dir
