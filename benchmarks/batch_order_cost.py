"""What the worker-count-independent batch order costs (issue 18), against the old per-rank shard order
(each rank drew from its own contiguous shard of train.bin; the new one draws over the whole file).

    python -m raygpt.prepare shakespeare_char --data-dir /tmp/bo-data --input ../shared/data/tinyshakespeare.txt
    python benchmarks/batch_order_cost.py /tmp/bo-data/shakespeare_char [--big-tokens 1000000000]
    python benchmarks/batch_order_cost.py --train [--world-size 2] [--rounds 8] [--shakespeare-dir DIR]
    python benchmarks/batch_order_cost.py --train --device cpu --tiny   # a CPU self-check, under a minute

Draws mode (a dataset folder): Batches.train_batch draws per second on one CPU, plus the dropout
reseed the new order adds per micro-step. --big-tokens also times a random train.bin of that many
tokens (2 bytes each, written next to the dataset, then removed), where a rank touching the whole file
rather than its shard may matter for the page cache.

--train: training tokens/s of one device, raygpt's own step (GPT, wrap_model, TrainStep, the
configured AdamW) as the last rank of --world-size workers runs it: its share of the configs' global
micro-batches (shakespeare_char's one micro-batch becomes one per rank, as the launcher requires), the
old order with the old loop's once-per-iteration torch.manual_seed, the new with TrainStep's reseed per
micro-step. Shapes: configs/train_gpt2.py on a random 300M-token train.bin (written to --work-dir once,
then reused) and configs/train_shakespeare_char.py on --shakespeare-dir or random tokens; bf16 and
compile on CUDA (the configs' compile modes), float32 and eager on CPU. After untimed warm-up (compile)
iterations, the orders alternate in rounds, each bounded by torch.cuda.synchronize, so a machine busy
with other work slows both alike; each figure is the median over rounds. The old order is rebuilt
here: raygpt no longer has it.
"""

import argparse
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from raygpt.config.cli import read_config
from raygpt.core.data import TRAIN_STREAM, Batches, window_starts
from raygpt.core.model import GPT, GPTConfig
from raygpt.core.parallel import enable_tf32, set_attention_backend, wrap_model
from raygpt.core.step import NonFiniteGuard, Precision, TrainStep
from raygpt.core.tokenizer import GPT2_VOCAB_SIZE, PADDED_GPT2_VOCAB_SIZE
from raygpt.worker.compile import CompileWorkers

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"shakespeare_char (64 x 256)": (64, 256), "gpt2 (12 x 1024)": (12, 1024)}


@dataclass
class TrainShape:
    name: str
    config: str  # under configs/
    iters_per_round: int  # about 1-3 s of an H100 per round
    data_vocab: int  # random token ids below this
    model_vocab: int
    train_tokens: int  # of a random train.bin


TRAIN_SHAPES = (
    TrainShape("gpt2 124M (12 x 768, block 1024, micro-batch 12)", "train_gpt2.py", 4, GPT2_VOCAB_SIZE,
               PADDED_GPT2_VOCAB_SIZE, 300_000_000),
    TrainShape("shakespeare_char (6 x 384, block 256, batch 64, dropout 0.2)", "train_shakespeare_char.py", 200,
               65, 65, 1_000_000),
)  # fmt: skip
# --tiny: the same configs shrunk to run on a CPU in seconds (vocab 256, 1M tokens).
TINY_KEYS = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=4"]
TINY_ACCUM = {"train_gpt2.py": 4}  # 2 per rank of 2


class ShardOrderBatches(Batches):
    """The order before: rank r drew windows of its own shard, keyed by (iter_num, rank, micro_step). The
    loop seeded dropout once per iteration (`seed_iteration`), not per micro-step."""

    def __init__(self, data_dir, block_size, batch_size, seed, rank, world_size, device="cpu"):
        super().__init__(data_dir, block_size, batch_size, seed, rank, world_size, device, accum_steps=1)
        n_tokens = self.train.n_starts + block_size
        per_rank = n_tokens // world_size
        self.rank, self.shard_start, self.shard_starts = rank, rank * per_rank, per_rank - block_size

    def train_batch(self, iter_num, micro_step):
        key = (iter_num, self.rank, micro_step)
        starts = self.shard_start + window_starts(self.seed, TRAIN_STREAM, key, self.batch_size, self.shard_starts)
        return self._to_device(self.train.windows(starts))

    def dropout_seed(self, iter_num, micro_step):
        return None

    def seed_iteration(self, iter_num: int) -> None:
        """What the old train.py did before every step, dropout or not."""
        torch.manual_seed(hash((self.seed, iter_num, self.rank)) & 0x7FFF_FFFF)


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


def write_random_tokens(path: Path, n_tokens: int, vocab_size: int) -> None:
    """A uint16 token file of random ids, written in chunks: no full copy in memory."""
    tokens = np.memmap(path, dtype=np.uint16, mode="w+", shape=(n_tokens,))
    for start in range(0, n_tokens, 1 << 26):
        chunk = tokens[start : start + (1 << 26)]
        chunk[:] = np.random.default_rng(start).integers(0, vocab_size, len(chunk), dtype=np.uint16)
    tokens.flush()


def draws_mode(args) -> None:
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
            write_random_tokens(big / "train.bin", args.big_tokens, GPT2_VOCAB_SIZE)
            shutil.copy(args.dataset_dir / "val.bin", big / "val.bin")
            print_table(f"random, {args.big_tokens / 1e9:.1f}B tokens", big, args.rounds, args.draws)
        finally:
            shutil.rmtree(big)


# ---- --train: tokens/s of raygpt's training step, old order against new ------------------------------


def random_dataset(work_dir: Path, n_train: int, vocab_size: int) -> Path:
    """A folder with a random train.bin of n_train tokens and a 1M-token val.bin; kept for the next run."""
    folder = work_dir / f"random-{vocab_size}-{n_train}"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n_tokens in (("train", n_train), ("val", 1 << 20)):
        path = folder / f"{split}.bin"
        if not path.exists() or path.stat().st_size != 2 * n_tokens:
            write_random_tokens(path, n_tokens, vocab_size)
    return folder


@dataclass
class Order:
    """One batch order's side of the comparison: its step, the batch it prefetched, its next iteration."""

    step: TrainStep
    batches: Batches
    iter_num: int = 0
    X: torch.Tensor | None = None
    Y: torch.Tensor | None = None
    tokens_per_s: list[float] = field(default_factory=list)

    def run(self, iters: int) -> None:
        """`iters` iterations as train.py's loop runs them (no host sync between them)."""
        if self.X is None:
            self.X, self.Y = self.batches.train_batch(self.iter_num, 0)
        seed_iteration: Callable[[int], None] | None = getattr(self.batches, "seed_iteration", None)
        for _ in range(iters):
            if seed_iteration is not None:
                seed_iteration(self.iter_num)
            _, _, self.X, self.Y = self.step(self.X, self.Y, self.iter_num)
            self.iter_num += 1


def shape_config(shape: TrainShape, args):
    """The shape's config file as the launcher reads it, with this device's dtype and compile."""
    cuda = args.device == "cuda"
    keys = [str(REPO / "configs" / shape.config), f"--dtype={'bfloat16' if cuda else 'float32'}",
            f"--compile={args.compile}", f"--device={args.device}"]  # fmt: skip
    if args.tiny:
        keys += TINY_KEYS + [f"--gradient_accumulation_steps={TINY_ACCUM.get(shape.config, 1)}"]
    return read_config(keys)[0]


def build_orders(shape: TrainShape, args, dataset_dir: Path) -> tuple[list[Order], int]:
    """One model, optimizer and compiled graph, trained by two steps: the old order's and the new one's.
    Returns them and the tokens one iteration of this rank trains on."""
    cfg = shape_config(shape, args)
    device = torch.device(args.device)
    precision = Precision(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    vocab_size = 256 if args.tiny else shape.model_vocab
    model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                      bias=cfg.bias, vocab_size=vocab_size, dropout=cfg.dropout)  # fmt: skip
    model = GPT(GPTConfig(**model_args)).to(device)
    wrapped = wrap_model(model, cfg, 1, device, precision.dtype)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                           device.type, verbose=False)  # fmt: skip
    # The launcher's split of the global micro-batches; a count below the workers' is one per rank.
    world_size, rank = args.world_size, args.world_size - 1
    accum_steps = max(1, cfg.gradient_accumulation_steps // world_size)
    common = (dataset_dir, cfg.block_size, cfg.batch_size, cfg.seed, rank, world_size, device)
    orders = []  # old, new
    for batches in (ShardOrderBatches(*common), Batches(*common, accum_steps)):
        guard = NonFiniteGuard(cfg.max_nonfinite_steps, device, announce=False)
        step = TrainStep(wrapped, optimizer, precision, batches, accum_steps, cfg.grad_clip, guard)
        orders.append(Order(step, batches))
    return orders, accum_steps * cfg.batch_size * cfg.block_size


def timed_rounds(orders: list[Order], rounds: int, iters: int, tokens_per_iter: int, sync) -> None:
    """Rounds of `iters` iterations, alternating which order goes first; tokens/s of each, sync to sync."""
    for r in range(rounds):
        for order in orders if r % 2 else orders[::-1]:
            sync()
            t0 = time.perf_counter()
            order.run(iters)
            sync()
            order.tokens_per_s.append(iters * tokens_per_iter / (time.perf_counter() - t0))


def measure_shape(shape: TrainShape, args) -> str:
    """The table row of one shape: median tokens/s of each order, their ratio, the per-round ratios."""
    if args.shakespeare_dir and shape.config == "train_shakespeare_char.py" and not args.tiny:
        dataset_dir, data = args.shakespeare_dir, f"{args.shakespeare_dir.name}"
    else:
        n_train = 1_000_000 if args.tiny else shape.train_tokens
        vocab_size = 256 if args.tiny else shape.data_vocab
        dataset_dir, data = random_dataset(args.work_dir, n_train, vocab_size), f"random, {n_train / 1e6:,.0f}M"
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    compile_workers = CompileWorkers(enabled=args.compile and cuda)
    compile_workers.start()
    orders, tokens_per_iter = build_orders(shape, args, dataset_dir)
    t0 = time.perf_counter()
    for order in orders:  # the first compiles; CUDA graphs record in the next ones
        order.run(args.warmup)
    sync()
    warmup_s = time.perf_counter() - t0
    compile_workers.stop_in_background()
    iters = args.iters or (2 if args.tiny else shape.iters_per_round)
    timed_rounds(orders, args.rounds, iters, tokens_per_iter, sync)
    old, new = (order.tokens_per_s for order in orders)
    ratios = [n / o for n, o in zip(new, old)]
    name = f"tiny {shape.config.removesuffix('.py')} (2 x 64, block 64, batch 4)" if args.tiny else shape.name
    print(f"{name}: old {[round(v) for v in old]}, new {[round(v) for v in new]} tokens/s", flush=True)
    return (f"| {name} | {data} | {tokens_per_iter:,} | {args.rounds} x {iters} | {warmup_s:.0f} s "
            f"| {statistics.median(old):,.0f} | {statistics.median(new):,.0f} "
            f"| {statistics.median(new) / statistics.median(old):.4f} "
            f"| {statistics.median(ratios):.4f} [{min(ratios):.4f}, {max(ratios):.4f}] |")  # fmt: skip


def train_mode(args) -> None:
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        torch.set_num_threads(1)  # a self-check, not a measurement: spare a shared CPU
    if args.device == "cuda":
        enable_tf32()
        set_attention_backend("auto")
        device_name = torch.cuda.get_device_name()
    else:
        device_name = "cpu"
    rows = [measure_shape(shape, args) for shape in TRAIN_SHAPES]
    print(f"\n`{shlex.join(['python', *sys.argv])}`\n")
    print(f"{device_name}, torch {torch.__version__}, the last rank of {args.world_size} workers, "
          f"compile {'on' if args.compile else 'off'}, warm-up: {args.warmup} iteration(s) per order\n")  # fmt: skip
    print("| shape | train.bin | tokens/iter (this rank) | rounds x iters | warm-up (compile) "
          "| old tokens/s (rank shard) | new tokens/s (whole file) | new / old (medians) "
          "| new / old per round: median [min, max] |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset_dir", type=Path, nargs="?", help="draws mode: a prepared dataset folder")
    parser.add_argument("--rounds", type=int, default=None, help="default: 20 (draws), 8 (--train)")
    parser.add_argument("--draws", type=int, default=200, help="draws per round and order")
    parser.add_argument("--big-tokens", type=int, default=0, help="also time a random train.bin this long")
    parser.add_argument("--train", action="store_true", help="training tokens/s instead of draws/s")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--world-size", type=int, default=2, help="simulate the last rank of this many workers")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations per order (default: 3)")
    parser.add_argument("--iters", type=int, default=0, help="iterations per round (default: per shape)")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "batch-order-cost")
    parser.add_argument("--shakespeare-dir", type=Path, help="a prepared shakespeare_char folder")
    parser.add_argument("--tiny", action="store_true", help="tiny models and data: a quick check on a CPU")
    args = parser.parse_args()
    if args.train == (args.dataset_dir is not None):
        parser.error("give either a dataset folder (draws/s) or --train (tokens/s)")
    if args.world_size < 1:
        parser.error("--world-size must be at least 1")
    args.compile = args.device == "cuda" if args.compile is None else args.compile
    args.rounds = args.rounds or (4 if args.tiny else 8 if args.train else 20)
    args.warmup = (1 if args.tiny else 3) if args.warmup is None else args.warmup
    train_mode(args) if args.train else draws_mode(args)


if __name__ == "__main__":
    main()
