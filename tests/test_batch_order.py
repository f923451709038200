"""The batch order does not depend on the worker count: the global batch of an iteration (its
windows and its dropout masks) is the same on 1, 2 or 4 workers, so is training, and a run resumed on
another worker count continues the same stream. Plain torch (gloo on loopback for real DDP), no Ray."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY_RUN

from raygpt.config.schema import TrainConfig
from raygpt.core.data import Batches
from raygpt.core.model import GPT, GPTConfig
from raygpt.core.parallel import wrap_model
from raygpt.core.step import NonFiniteGuard, Precision, TrainStep
from raygpt.processes import exit_without_teardown

MICRO_BATCHES = 4  # global micro-batches per iteration (gradient_accumulation_steps)


def write_positions(directory, n_train=5000, n_val=500):
    """A dataset whose token at position p is p: a window's first token says where it starts."""
    directory.mkdir(parents=True, exist_ok=True)
    np.arange(n_train, dtype=np.uint16).tofile(directory / "train.bin")
    np.arange(n_val, dtype=np.uint16).tofile(directory / "val.bin")
    return directory


def rank_batches(data, world_size, micro_batches=MICRO_BATCHES, seed=11):
    accum = micro_batches // world_size
    return [
        Batches(data, block_size=16, batch_size=4, seed=seed, rank=rank, world_size=world_size, accum_steps=accum)
        for rank in range(world_size)
    ]


def global_batch(parts: list[Batches], iter_num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's micro-batches of `iter_num`, concatenated in rank order."""
    accum = MICRO_BATCHES // len(parts)
    draws = [part.train_batch(iter_num, m) for part in parts for m in range(accum)]
    return torch.cat([x for x, _ in draws]), torch.cat([y for _, y in draws])


@pytest.mark.parametrize("iter_num", [0, 1, 37])
def test_the_global_batch_is_the_same_on_1_2_and_4_workers(tmp_path, iter_num):
    data = write_positions(tmp_path / "d")
    x1, y1 = global_batch(rank_batches(data, 1), iter_num)
    for world_size in (2, 4):
        x, y = global_batch(rank_batches(data, world_size), iter_num)
        assert torch.equal(x, x1) and torch.equal(y, y1), world_size
    assert len(set(x1[:, 0].tolist())) > 1  # micro-batches differ from each other


def test_every_worker_draws_from_the_whole_file(tmp_path):
    data = write_positions(tmp_path / "d", n_train=4000)
    last = rank_batches(data, 4)[3]
    starts = torch.cat([last.train_batch(i, 0)[0][:, 0] for i in range(50)])
    # Under the sharded order the last of 4 ranks only saw positions 3000 and up.
    assert starts.min() < 1000 and starts.max() > 3000


def test_a_rank_needs_its_accumulation_to_place_its_micro_batches(tmp_path):
    data = write_positions(tmp_path / "d")
    with pytest.raises(ValueError, match="accum_steps"):
        Batches(data, block_size=16, batch_size=4, seed=1, rank=1, world_size=2)


def dropout_losses(model: GPT, parts: list[Batches], iter_num: int) -> list[float]:
    """The training-mode loss of each global micro-batch of `iter_num`, each under the dropout seed its
    rank gives it (what TrainStep sets before each micro-step)."""
    accum = MICRO_BATCHES // len(parts)
    losses = []
    for part in parts:
        for m in range(accum):
            torch.manual_seed(part.dropout_seed(iter_num, m))
            losses.append(model(*part.train_batch(iter_num, m))[1].item())
    return losses


def test_dropout_masks_follow_the_global_micro_batch(tmp_path):
    data = write_positions(tmp_path / "d", n_train=3000)
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=3000, dropout=0.3)
    model = GPT(config).train()
    one_worker = dropout_losses(model, rank_batches(data, 1), iter_num=5)
    assert dropout_losses(model, rank_batches(data, 2), iter_num=5) == one_worker
    assert dropout_losses(model, rank_batches(data, 4), iter_num=5) == one_worker
    # The masks matter: the same batch under another micro-batch's seed gives another loss.
    part = rank_batches(data, 1)[0]
    torch.manual_seed(part.dropout_seed(5, 1))
    assert model(*part.train_batch(5, 0))[1].item() != one_worker[0]


def test_a_4_worker_checkpoint_continues_on_2_workers_as_an_uninterrupted_2_worker_run(tmp_path):
    data = write_positions(tmp_path / "d")
    checkpoint_iter, last_iter = 6, 10
    four = rank_batches(data, 4)
    for iter_num in range(checkpoint_iter):  # the 4-worker run up to its checkpoint
        global_batch(four, iter_num)
    resumed = rank_batches(data, 2)  # built from nothing but the checkpoint's iter_num
    uninterrupted = rank_batches(data, 2)
    for iter_num in range(checkpoint_iter):
        global_batch(uninterrupted, iter_num)
    for iter_num in range(checkpoint_iter, last_iter):
        for rank in range(2):
            for m in range(MICRO_BATCHES // 2):
                x, y = resumed[rank].train_batch(iter_num, m)
                x_ref, y_ref = uninterrupted[rank].train_batch(iter_num, m)
                assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
                assert resumed[rank].dropout_seed(iter_num, m) == uninterrupted[rank].dropout_seed(iter_num, m)
        # ... and the stream is the one the 4 workers would have gone on with.
        assert all(torch.equal(a, b) for a, b in zip(global_batch(resumed, iter_num), global_batch(four, iter_num)))


# ---- training on 1 and 2 workers: the same losses and weights ---------------------------------------
TRAIN_ITERS = 4


def train_losses(rank: int, world_size: int, data_dir: str) -> tuple[list[float], torch.Tensor]:
    """A few iterations of TrainStep on this rank (DDP when world_size > 1, as train.py wraps it); the
    losses averaged over ranks, and the final weights."""
    cfg = TrainConfig(**{**TINY_RUN, "dropout": 0.1, "gradient_accumulation_steps": MICRO_BATCHES})
    accum = cfg.gradient_accumulation_steps // world_size
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                          vocab_size=65, dropout=cfg.dropout, bias=cfg.bias))  # fmt: skip
    device = torch.device("cpu")
    wrapped = wrap_model(model, cfg, world_size, device, "float32")
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), "cpu", False)
    batches = Batches(f"{data_dir}/shakespeare_char", cfg.block_size, cfg.batch_size, cfg.seed, rank, world_size,
                      device, accum_steps=accum)  # fmt: skip
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, device, announce=False)
    step = TrainStep(wrapped, optimizer, Precision("float32", device), batches, accum, cfg.grad_clip, guard)
    X, Y = batches.train_batch(0, 0)
    losses = []
    for iter_num in range(TRAIN_ITERS):
        loss_sum, _, X, Y = step(X, Y, iter_num)
        if world_size > 1:
            dist.all_reduce(loss_sum)  # each rank's loss_sum is the mean over its micro-batches
        losses.append(loss_sum.item() / world_size)
    return losses, torch.cat([p.detach().flatten() for p in model.parameters()])


def ddp_worker(rank: int, world_size: int, data_dir: str, rendezvous: str, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        losses, weights = train_losses(rank, world_size, data_dir)
        if rank == 0:
            torch.save({"losses": losses, "weights": weights}, results)
    finally:
        dist.destroy_process_group()
    # A process that wrapped a model in DDP still runs gloo's threads (two pt_gloo_runloop, one
    # gloo_tcp_loop) after destroy_process_group: torch keeps the group alive in C++ (a process without
    # DDP has them joined there). The interpreter's teardown at exit then races those threads, and now and
    # then aborts the process ("terminate called without an active exception", SIGABRT). The results are
    # written: end as the launcher ends, without that teardown.
    exit_without_teardown(0)


def test_training_on_1_and_2_workers_gives_the_same_losses_and_weights(tmp_path, char_data):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each DDP worker
    try:
        one_losses, one_weights = train_losses(0, 1, str(char_data))
    finally:
        torch.set_num_threads(threads)
    results = tmp_path / "two.pt"
    mp.spawn(ddp_worker, args=(2, str(char_data), str(tmp_path / "rendezvous"), str(results)), nprocs=2)
    two = torch.load(results)
    # Same global batches and dropout masks; only the order of float sums differs (DDP's all-reduce).
    assert two["losses"] == pytest.approx(one_losses, rel=1e-5)
    torch.testing.assert_close(two["weights"], one_weights, rtol=1e-4, atol=1e-5)
    assert one_losses[0] != one_losses[-1]  # it trained


def test_dropout_is_reseeded_only_where_the_model_has_dropout(tmp_path, char_data):
    """Without dropout the step draws no random numbers and sets no seed: torch's stream is untouched."""
    cfg = TrainConfig(**TINY_RUN)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=cfg.block_size, vocab_size=65))
    wrapped = wrap_model(model, cfg, 1, torch.device("cpu"), "float32")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = Batches(char_data / "shakespeare_char", cfg.block_size, 4, seed=1)
    guard = NonFiniteGuard(0, torch.device("cpu"), announce=False)
    step = TrainStep(wrapped, optimizer, Precision("float32", "cpu"), batches, 2, 1.0, guard)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    step(*batches.train_batch(0, 0), 0)
    assert step.dropout_generator is None and torch.equal(torch.get_rng_state(), state)
