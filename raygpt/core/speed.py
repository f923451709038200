"""Speed options that leave the numerics alone: attention backend, torch.compile mode, batched eval.

Shared by the training loop and raygpt.bench so that what is benchmarked is what trains. Process
management (compile workers, a fast exit) is in raygpt.processes.
"""

from __future__ import annotations

import torch

# Config name -> the torch.backends.cuda switch that enables it.
_ATTENTION_SWITCHES = {
    "flash": "enable_flash_sdp",
    "cudnn": "enable_cudnn_sdp",
    "efficient": "enable_mem_efficient_sdp",
    "math": "enable_math_sdp",
}


def set_attention_backend(name: str) -> None:
    """Restrict scaled_dot_product_attention to one CUDA backend ('auto' leaves PyTorch's choice).

    The math backend stays enabled as the fallback for inputs the chosen kernel does not support."""
    if name == "auto":
        return
    for backend, switch in _ATTENTION_SWITCHES.items():
        getattr(torch.backends.cuda, switch)(backend in (name, "math"))


def compile_model(model: torch.nn.Module, mode: str, regions: bool = False) -> torch.nn.Module:
    """torch.compile with fixed shapes: the batch shapes of training and of eval never change.

    regions=True compiles each transformer block in place instead of the whole model: the blocks are
    identical, so one block's graph is compiled once and reused by all of them, and compile time no longer
    grows with n_layer (benchmarks/RESULTS.md has the measurement). The
    embeddings, final LayerNorm, head and loss then run eagerly."""
    options = dict(mode=None if mode == "default" else mode, dynamic=False)
    if not regions:
        return torch.compile(model, **options)
    for block in model.transformer.h:
        block.compile(**options)
    return model


def uses_cuda_graphs(mode: str, device_type: str) -> bool:
    return device_type == "cuda" and mode in ("reduce-overhead", "max-autotune")


def eval_group_size(n_batches: int, batch_size: int, block_size: int, vocab_size: int, n_embd: int) -> int:
    """How many eval batches to run as one forward pass.

    A small model is launch-bound: 200 eval batches of 64 x 256 tokens cost 200 launches of a few
    milliseconds each, while one pass over 10 of them costs barely more than one. The group is bounded
    so its largest activation (logits or the MLP's hidden layer) stays under 2**28 elements, and it
    divides n_batches so every pass has the same shape (no recompiles). GPT-2 sizes stay at 1."""
    largest_row = batch_size * block_size * max(vocab_size, 4 * n_embd)
    limit = max(1, min(n_batches, (1 << 28) // largest_row))
    return max(g for g in range(1, limit + 1) if n_batches % g == 0)
