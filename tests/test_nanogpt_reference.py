"""data_order=nanogpt against nanoGPT's training written out here, independently of raygpt's own code.

The reference is GPT-2 as nanoGPT builds and trains it, from its published behaviour: token and position
embeddings, pre-LayerNorm blocks (causal self-attention, a 4x GELU MLP), a final LayerNorm and a head
tied to the token embedding; normal(0, 0.02) init with the residual projections at 0.02/sqrt(2*n_layer);
AdamW with weight decay on matrices only; warmup then cosine learning rate; clipping; and one torch RNG
stream that draws the batches (torch.randint), the eval batches and the dropout masks in train.py's
order. Nothing here imports raygpt's model or loop, so a shared mistake cannot hide.
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TINY_RUN

from raygpt import launch
from raygpt.config.schema import TrainConfig
from raygpt.core import checkpoint


def nanogpt_lr(it: int, cfg: TrainConfig) -> float:
    """nanoGPT's schedule: linear warmup to learning_rate, cosine down to min_lr at lr_decay_iters, then min_lr."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head, self.dropout = cfg.n_head, cfg.dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, 2))
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))  # exact GELU, not GPT-2's tanh approximation


class Block(nn.Module):
    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ReferenceGPT(nn.Module):
    def __init__(self, cfg: TrainConfig, vocab_size: int):
        super().__init__()
        # Constructing a Linear or an Embedding draws from the RNG too: nanoGPT's order, module by module.
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self.init_normal)  # children first, in construction order; the tied matrix is drawn twice
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):  # the projections that add to the residual stream
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def init_normal(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets):
        positions = torch.arange(idx.size(1))
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def train_like_nanogpt(cfg: TrainConfig, dataset_dir) -> tuple[list, dict]:
    """nanoGPT train.py's loop for one process. Returns the (iter, train loss, val loss) evals and the
    weights after max_iters steps."""

    def get_batch(split):
        data = np.memmap(dataset_dir / f"{split}.bin", dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - cfg.block_size, (cfg.batch_size,))
        x = torch.stack([torch.from_numpy(data[i : i + cfg.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + cfg.block_size].astype(np.int64)) for i in ix])
        return x, y

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        means = [
            torch.tensor([model(*get_batch(split)).item() for _ in range(cfg.eval_iters)]).mean().item()
            for split in ("train", "val")
        ]
        model.train()
        return means

    torch.set_num_threads(int(cfg.cpus_per_worker))  # raygpt's thread count: the same float summation order
    torch.manual_seed(cfg.seed)
    vocab_size = json.loads((dataset_dir / "meta.json").read_text())["vocab_size"]
    model = ReferenceGPT(cfg, vocab_size)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": vectors, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
        betas=(cfg.beta1, cfg.beta2),
    )
    evals = []
    X, Y = get_batch("train")
    for it in range(cfg.max_iters + 1):
        for group in optimizer.param_groups:
            group["lr"] = nanogpt_lr(it, cfg)
        if it % cfg.eval_interval == 0:
            evals.append((it, *estimate_loss()))
        if it == cfg.max_iters:  # raygpt stops after this eval; train.py would take one more step
            break
        for _ in range(cfg.gradient_accumulation_steps):
            loss = model(X, Y) / cfg.gradient_accumulation_steps
            X, Y = get_batch("train")  # the next batch is drawn before the backward pass
            loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return evals, model.state_dict()


def test_get_lr_matches_nanogpt_at_the_edges():
    from raygpt.core.step import get_lr

    cfg = TrainConfig(learning_rate=6e-4, min_lr=6e-5, warmup_iters=100, lr_decay_iters=1000)
    for it in (0, 1, 99, 100, 101, 550, 999, 1000, 1001, 5000):
        assert get_lr(it, cfg) == pytest.approx(nanogpt_lr(it, cfg), rel=1e-12, abs=1e-15), it
    assert get_lr(0, cfg.replace(decay_lr=False)) == 6e-4
    assert get_lr(10**6, cfg.replace(decay_lr=False)) == 6e-4


RUN = {**TINY_RUN, "dropout": 0.1, "bias": True, "local_mode": True, "cpus_per_worker": 1}


def test_nanogpt_data_order_replays_nanogpt_numbers(tmp_path, char_data):
    """data_order=nanogpt: the same weights, step for step, as nanoGPT's loop on the same seed."""

    def config(name, **overrides):
        return TrainConfig(**{**RUN, "data_dir": str(char_data), "out_dir": str(tmp_path / name), **overrides})

    replay = config("nanogpt-order", data_order="nanogpt")
    result = launch.run(replay)
    state = checkpoint.load(tmp_path / "nanogpt-order" / "ckpt.pt")
    weights = state["model"]
    expected_evals, expected_weights = train_like_nanogpt(replay, char_data / "shakespeare_char")
    assert weights.keys() == expected_weights.keys()
    for key, tensor in expected_weights.items():
        assert torch.equal(weights[key], tensor), key
    last_it, last_train, last_val = expected_evals[-1]
    assert result.metrics["iter"] == last_it
    assert result.metrics["val_loss"] == pytest.approx(last_val, rel=1e-6)
    assert result.metrics["train_loss"] == pytest.approx(last_train, rel=1e-6)
    assert state["best_val_loss"] == pytest.approx(min(v for _, _, v in expected_evals), rel=1e-6)
    # The default order draws other batches: the match above depends on the order, it is not automatic.
    launch.run(config("seeded-order"))
    seeded = checkpoint.load(tmp_path / "seeded-order" / "ckpt.pt")["model"]
    assert not torch.equal(seeded["lm_head.weight"], expected_weights["lm_head.weight"])
