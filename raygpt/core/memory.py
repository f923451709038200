"""A rough estimate of a training run's memory, to refuse what cannot fit before allocating any of it.

Only runs that need far more than the device has (1.5x) are refused, with the estimate, so the
estimate need not be exact: fp32 weights, gradients and AdamW's two moments (16 bytes a parameter),
the activations the backward pass keeps (16 x n_embd values a token and layer at autocast precision,
fitted to the peak memory of compiled GPT-2 runs in benchmarks/RESULTS.md; fused attention keeps no
T x T matrix), and the logits with their fp32 loss.
"""

from __future__ import annotations

import os

import torch

from raygpt.errors import RaygptError

REFUSE_ABOVE = 1.5  # x the device's memory


class WontFitError(RaygptError):
    """The run needs far more memory than the device has; the message is one line."""


def parameter_count(n_layer: int, n_embd: int, vocab_size: int, block_size: int) -> int:
    return 12 * n_layer * n_embd**2 + (vocab_size + block_size) * n_embd


def millions(n: int) -> str:
    """'124M', '0.02M': a small model is not '0M'."""
    return f"{n / 1e6:,.0f}M" if n >= 1e7 else f"{n / 1e6:.2g}M"


def estimate_bytes(model_args: dict, batch_size: int, dtype: str) -> int:
    L, d, V, T = model_args["n_layer"], model_args["n_embd"], model_args["vocab_size"], model_args["block_size"]
    activation_bytes = 4 if dtype == "float32" else 2
    tokens = batch_size * T
    states = 16 * parameter_count(L, d, V, T)
    activations = tokens * L * 16 * d * activation_bytes
    logits = tokens * V * (activation_bytes + 4)
    return states + activations + logits


def device_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, torch.cuda.get_device_name(device)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this host's memory"


def check_fits(model_args: dict, batch_size: int, dtype: str, device: torch.device) -> None:
    """Refuse a run whose estimate exceeds REFUSE_ABOVE x the device's memory (set check_memory=False
    to try anyway, e.g. to show an out-of-memory run in a benchmark)."""
    needed = estimate_bytes(model_args, batch_size, dtype)
    have, name = device_memory(device)
    if needed > REFUSE_ABOVE * have:
        params = parameter_count(
            model_args["n_layer"], model_args["n_embd"], model_args["vocab_size"], model_args["block_size"]
        )
        raise WontFitError(
            f"this run needs about {needed / 2**30:,.0f} GiB ({millions(params)} parameters, micro-batch "
            f"{batch_size} x {model_args['block_size']} tokens) but {name} has {have / 2**30:,.0f} GiB: lower "
            "batch_size (and raise gradient_accumulation_steps), block_size or the model, or pass "
            "--check_memory=False to try anyway"
        )
