"""Wrap the model for the run: compile, then data parallelism. The one place that knows how.

The loop gets two handles: `train` runs the training step's forward and backward (compiled, and under
DDP when there are several workers), `eval` runs evaluation's forward (compiled, not wrapped: eval
needs no gradient sync). The plain module stays the owner of the weights (state_dict, MFU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from raygpt.speed import compile_model, uses_cuda_graphs


@dataclass
class WrappedModel:
    module: torch.nn.Module  # the plain model: its parameters and state_dict
    train: torch.nn.Module
    eval: torch.nn.Module
    # DDP syncs gradients at every backward unless told not to: the step turns it off until the last micro-step.
    no_sync_until_last: bool
    cuda_graphs: bool  # each forward must be marked as a new CUDA-graph step


def wrap_model(model: torch.nn.Module, cfg, world_size: int, device: torch.device) -> WrappedModel:
    """Compile (cfg.compile, cfg.compile_mode, cfg.compile_regions), then DDP when world_size > 1."""
    compiled = model
    cuda_graphs = False
    if cfg.compile:
        mode = cfg.compile_mode if device.type == "cuda" else "default"
        compiled = compile_model(model, mode, cfg.compile_regions)
        cuda_graphs = uses_cuda_graphs(mode, device.type)
    train = compiled
    if world_size > 1:
        train = DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None)
    return WrappedModel(
        module=model, train=train, eval=compiled, no_sync_until_last=world_size > 1, cuda_graphs=cuda_graphs
    )


def weights_in_sync(model: torch.nn.Module, world_size: int) -> bool:
    """Data parallelism keeps every rank's weights identical; compare a cheap fingerprint to prove it.
    A collective: every rank calls it."""
    with torch.no_grad():
        fingerprint = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    if world_size == 1:
        return True
    fingerprints = [torch.zeros_like(fingerprint) for _ in range(world_size)]
    torch.distributed.all_gather(fingerprints, fingerprint)
    return all(torch.equal(f, fingerprints[0]) for f in fingerprints)
