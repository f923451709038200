"""What the worker-count-independent batch order costs: Batches.train_batch draws per second with the
old order (each rank drew from its own contiguous shard of train.bin) against the new one (every rank
draws over the whole file), on one CPU, plus the dropout reseed the new order adds per micro-step.

    python -m raygpt.prepare shakespeare_char --data-dir /tmp/bo-data --input ../shared/data/tinyshakespeare.txt
    python benchmarks/batch_order_cost.py /tmp/bo-data/shakespeare_char [--big-tokens 1000000000]

The two orders alternate in short rounds, so a machine busy with other work slows both alike; each
figure is the median over rounds. --big-tokens also times a random train.bin of that many tokens (2
bytes each, written next to the dataset, then removed), where a rank touching the whole file rather
than its shard may matter for the page cache. The old order is rebuilt here: raygpt no longer has it.
"""

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from raygpt.data import TRAIN_STREAM, Batches, window_starts

SHAPES = {"shakespeare_char (64 x 256)": (64, 256), "gpt2 (12 x 1024)": (12, 1024)}


class ShardOrderBatches(Batches):
    """The order before: rank r drew windows of its own shard, keyed by (iter_num, rank, micro_step)."""

    def __init__(self, data_dir, block_size, batch_size, seed, rank, world_size):
        super().__init__(data_dir, block_size, batch_size, seed, rank, world_size, accum_steps=1)
        n_tokens = self.train.n_starts + block_size
        per_rank = n_tokens // world_size
        self.rank, self.shard_start, self.shard_starts = rank, rank * per_rank, per_rank - block_size

    def train_batch(self, iter_num, micro_step):
        key = (iter_num, self.rank, micro_step)
        starts = self.shard_start + window_starts(self.seed, TRAIN_STREAM, key, self.batch_size, self.shard_starts)
        return self._to_device(self.train.windows(starts))


def draws_per_second(batches: Batches, first_iter: int, draws: int) -> float:
    t0 = time.perf_counter()
    for i in range(first_iter, first_iter + draws):
        batches.train_batch(i, 0)
    return draws / (time.perf_counter() - t0)


def compare(data_dir: Path, batch_size: int, block_size: int, world_size: int, rounds: int, draws: int):
    """Median draws/s of the last rank of `world_size`, old order then new."""
    rank = world_size - 1
    old = ShardOrderBatches(data_dir, block_size, batch_size, 1337, rank, world_size)
    new = Batches(data_dir, block_size, batch_size, 1337, rank, world_size, accum_steps=1)
    rates = {"old": [], "new": []}
    for r in range(rounds):
        for name, batches in (("old", old), ("new", new)) if r % 2 else (("new", new), ("old", old)):
            rates[name].append(draws_per_second(batches, r * draws, draws))
    return statistics.median(rates["old"]), statistics.median(rates["new"])


def reseed_microseconds(n: int = 20000) -> float:
    """What TrainStep adds per micro-step when the model has dropout: seeding the device's generator."""
    generator = torch.default_generator
    t0 = time.perf_counter()
    for i in range(n):
        generator.manual_seed(i)
    return (time.perf_counter() - t0) / n * 1e6


def print_table(label: str, data_dir: Path, rounds: int, draws: int) -> None:
    for shape, (batch_size, block_size) in SHAPES.items():
        for world_size in (2, 8):
            old, new = compare(data_dir, batch_size, block_size, world_size, rounds, draws)
            print(f"| {label} | {shape} | {world_size} | {old:,.0f} | {new:,.0f} | {new / old:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset_dir", type=Path, help="a prepared dataset folder (train.bin, val.bin)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--draws", type=int, default=200, help="draws per round and order")
    parser.add_argument("--big-tokens", type=int, default=0, help="also time a random train.bin this long")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"dropout reseed per micro-step (CPU generator): {reseed_microseconds():.1f} us")
    print("| train.bin | micro-batch (batch x block) | workers | old draws/s (rank shard) | new draws/s (whole file) "
          "| new / old |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    n_tokens = len(np.memmap(args.dataset_dir / "train.bin", dtype=np.uint16, mode="r"))
    print_table(f"{args.dataset_dir.name}, {n_tokens / 1e6:.1f}M tokens", args.dataset_dir, args.rounds, args.draws)
    if args.big_tokens:
        big = Path(tempfile.mkdtemp(prefix="big-", dir=args.dataset_dir.parent))
        try:
            tokens = np.memmap(big / "train.bin", dtype=np.uint16, mode="w+", shape=(args.big_tokens,))
            for start in range(0, args.big_tokens, 1 << 26):  # in chunks: no full copy in memory
                chunk = tokens[start : start + (1 << 26)]
                chunk[:] = np.random.default_rng(start).integers(0, 50257, len(chunk), dtype=np.uint16)
            tokens.flush()
            del tokens
            shutil.copy(args.dataset_dir / "val.bin", big / "val.bin")
            print_table(f"random, {args.big_tokens / 1e9:.1f}B tokens", big, args.rounds, args.draws)
        finally:
            shutil.rmtree(big)


if __name__ == "__main__":
    main()
