"""Speed options that leave the numerics alone: attention backend, torch.compile mode, batched eval.

Shared by the training loop and raygpt.bench so that what is benchmarked is what trains.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn

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
    grows with n_layer (a 6-layer model's first step: 18 s instead of 42 s on 2 CPU cores). The
    embeddings, final LayerNorm, head and loss then run eagerly."""
    options = dict(mode=None if mode == "default" else mode, dynamic=False)
    if not regions:
        return torch.compile(model, **options)
    for block in model.transformer.h:
        block.compile(**options)
    return model


def start_compile_workers() -> None:
    """Start Inductor's pool of compile-worker processes now instead of at the first compiled call.

    Each worker imports torch and Triton, which takes seconds; started before the model is built, they
    boot while the optimizer, the data and the first eval are set up, and the compile finds them ready
    (Inductor compiles a kernel in the main process, one at a time, while its pool is not ready yet).
    A private torch API, so any failure just leaves torch to start the pool itself."""
    try:
        from torch._inductor.async_compile import maybe_warm_pool

        maybe_warm_pool()
    except Exception:  # noqa: BLE001 - an optimization only
        pass


def stop_compile_workers() -> threading.Thread | None:
    """Shut the compile workers down in the background once the graphs are compiled.

    Otherwise torch does it at interpreter exit, after the run's last line, and the process takes
    seconds longer to end. A later compile (a recompile, an eval graph first used after a resume) starts
    a new pool as the first one did; join the returned thread before one, so it does not pick up the
    pool that is being shut down."""
    try:
        from torch._inductor.async_compile import shutdown_compile_workers
    except Exception:  # noqa: BLE001
        return None
    # Not a daemon: exit waits for a clean shutdown rather than killing the thread halfway through it.
    thread = threading.Thread(target=shutdown_compile_workers, name="stop-compile-workers")
    thread.start()
    return thread


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


def skip_nonfinite_on_device(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> torch.Tensor | None:
    """Step `optimizer` unless grad_norm is not finite, deciding on the GPU instead of the host.

    Fused AdamW takes a `found_inf` flag (the mechanism GradScaler uses) and skips the update, step
    count included, when it is set, so the CPU never waits for the GPU here and keeps queueing work.
    Returns the on-device "skipped" flag, or None when the optimizer cannot do this (the caller then
    checks on the host)."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return None
    skipped = (~torch.isfinite(grad_norm)).float()
    optimizer.found_inf = skipped
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
    return skipped


def exit_without_teardown(code: int) -> NoReturn:
    """End the process as interpreter exit would, minus the teardown of every module and object.

    After a GPU run that teardown (CUDA graphs, the CUDA context, then torch's and Ray's modules) takes
    ~2 s of an 80 s shakespeare_char run (H100, local mode) and does nothing a finished run needs: the
    checkpoint is written and closed, the results printed. What a normal exit does for the program
    still happens, in the same order: other non-daemon threads are joined, then the atexit handlers run
    (Ray's shutdown, logging's flush, Inductor's compile-worker shutdown, WandB's)."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # CPython's own exit path; errors in handlers are printed, as at exit
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
