"""Corpus tokenization spread over a Ray cluster: `python -m raygpt.prepare NAME --input ... --ray`.

The driver reads the documents (raygpt.prepare.iter_documents: reading is far faster than BPE, and no node
needs the input files) and draws each document's split with the same seeded rng calls as the
single-process path. Ray tasks tokenize groups of documents; their results are written strictly in
submission order, so train.bin, val.bin and meta.json are byte for byte those of the single-process run.
"""

from __future__ import annotations

import collections
import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from raygpt.core.tokenizer import EOT_TOKEN

# Characters of text per task: large enough that a task's overhead is small next to its BPE work,
# small enough that a few in flight per CPU keep every core busy and the driver's memory bounded.
TASK_CHARS = 4_000_000
TASKS_PER_CPU = 2


def connect_ray(address: str | None) -> bool:
    """Use this process's Ray connection, else join `address` / RAY_ADDRESS or start a local Ray (as the
    launcher does); True when this call connected, so the caller disconnects again."""
    import ray

    if ray.is_initialized():
        return False
    from raygpt.driver.ray_cluster import connect

    connect(address)
    return True


def tokenize_group(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every document's GPT-2 tokens and an EOT, concatenated, and each document's token count."""
    from raygpt.core.tokenizer import gpt2_encoding

    encoding = gpt2_encoding()
    # One CPU per task: a plain loop, as tiktoken's batch encoder costs a thread pool hand-off per document.
    encoded = [encoding.encode_ordinary(doc) + [EOT_TOKEN] for doc in docs]
    lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
    tokens = np.array(list(itertools.chain.from_iterable(encoded)), dtype=np.uint16)
    return tokens, lengths


def document_groups(
    batches: Iterator[tuple[list[str], int]], val_fraction: float, rng: np.random.Generator
) -> Iterator[tuple[list[str], np.ndarray, int]]:
    """iter_documents' batches gathered into tasks of about TASK_CHARS characters, with each document's
    val draw taken batch by batch in order, exactly as tokenize_documents takes it."""
    docs, draws, work, chars = [], [], 0, 0
    for batch, work_in_batch in batches:
        draws.append(rng.random(len(batch)) < val_fraction)
        docs.extend(batch)
        work += work_in_batch
        chars += sum(len(doc) for doc in batch)
        if chars >= TASK_CHARS:
            yield docs, np.concatenate(draws), work
            docs, draws, work, chars = [], [], 0, 0
    if docs or work:
        yield docs, np.concatenate(draws) if draws else np.zeros(0, dtype=bool), work


def write_group(tokens: np.ndarray, lengths: np.ndarray, to_val: np.ndarray, outputs: dict[str, BinaryIO]) -> dict:
    """A task's documents to their splits, in document order; returns the tokens written to each."""
    is_val = np.repeat(to_val, lengths)
    train, val = tokens[~is_val], tokens[is_val]
    outputs["train"].write(train.tobytes())
    outputs["val"].write(val.tobytes())
    return {"train": len(train), "val": len(val)}


def tokenize_documents_on_ray(
    name: str,
    paths: list[Path],
    outputs: dict[str, BinaryIO],
    work: int,
    text_column: str,
    one_doc_per_line: bool,
    val_fraction: float,
    rng: np.random.Generator,
) -> tuple[int, dict[str, int]]:
    """tokenize_documents' contract (same outputs, same return) with the BPE work done by Ray tasks."""
    import ray

    from raygpt.errors import one_line
    from raygpt.prepare import PrepareError, interrupts_between_batches, iter_documents

    tokenize = ray.remote(num_cpus=1)(tokenize_group)
    max_in_flight = max(2, TASKS_PER_CPU * int(ray.cluster_resources().get("CPU", 1)))
    counts = {"train": 0, "val": 0}
    docs_done = work_done = 0
    start = last_print = time.time()
    in_flight: collections.deque = collections.deque()

    def write_oldest() -> None:
        nonlocal docs_done, work_done
        result, to_val, work_in_group = in_flight.popleft()
        try:
            tokens, lengths = ray.get(result)
        except ray.exceptions.RayError as e:  # e.g. a node that cannot load GPT-2's BPE files
            cause = getattr(e, "cause", None) or e  # a task's own exception, not Ray's traceback header
            raise PrepareError(f"a Ray tokenizer task failed ({one_line(str(cause))}); run without --ray") from None
        for split, written in write_group(tokens, lengths, to_val, outputs).items():
            counts[split] += written
        docs_done += len(to_val)
        work_done += work_in_group

    with interrupts_between_batches() as check_interrupt:
        groups = document_groups(iter_documents(paths, text_column, one_doc_per_line), val_fraction, rng)
        for docs, to_val, work_in_group in groups:
            check_interrupt()
            in_flight.append((tokenize.remote(docs) if docs else ray.put(tokenize_group([])), to_val, work_in_group))
            while len(in_flight) >= max_in_flight:
                write_oldest()
                check_interrupt()
            if time.time() - last_print >= 2.0:
                last_print = time.time()
                print_progress(name, docs_done, counts, work_done, work, last_print - start)
        while in_flight:
            write_oldest()
            check_interrupt()
    return docs_done, counts


def print_progress(name: str, docs: int, counts: dict[str, int], work_done: int, work: int, elapsed: float) -> None:
    eta = (work - work_done) * elapsed / max(work_done, 1)
    print(
        f"{name}: {docs:,} docs ({docs / elapsed:,.0f}/s), {(counts['train'] + counts['val']) / elapsed:,.0f} "
        f"tokens/s on Ray, {100 * work_done / max(work, 1):.1f}%, eta {eta:,.0f}s",
        file=sys.stderr,
        flush=True,
    )
