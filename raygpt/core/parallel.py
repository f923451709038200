"""The device and the model's parallel form: the device's options (`setup_device`, for the worker and
raygpt.bench alike, so that what is benchmarked is what trains), torch's CPU thread count (`cpu_threads`,
for training, raygpt.bench and raygpt.sample), NCCL's communicator made early (`CommunicatorWarmup`), and
the wrap of the model for the run: activation checkpointing, compile, then DDP or FSDP2. The one place
that knows how.

The loop gets two handles: `train` runs the training step's forward and backward, `eval` runs
evaluation's forward. Under DDP `eval` is the compiled model without the DDP wrapper (eval needs no
gradient sync); under FSDP both are the sharded model, whose forward gathers each block's weights.
The plain module stays the owner of the weights (state_dict, MFU); the optimizer is built on it after
wrapping, since FSDP replaces its parameters with sharded ones.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from raygpt.core.fp8 import convert_linears
from raygpt.core.memory import device_memory

PARAM_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
UNSHARDED_COPY_LIMIT = 0.2  # of the device's memory, for keeping weights gathered between micro-steps


def setup_device(cfg, device: torch.device) -> None:
    """The device options of a training process, the same for the worker and raygpt.bench: deterministic
    kernels (cfg.deterministic), then on a GPU TF32 matmuls and the attention backend (cfg.attention)."""
    attention = make_deterministic(cfg.attention) if cfg.deterministic else cfg.attention
    if device.type == "cuda":
        enable_tf32()
        set_attention_backend(attention)


def enable_tf32() -> None:
    """TF32 matmuls and convolutions on Ampere and newer GPUs, as nanoGPT."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def make_deterministic(attention: str) -> str:
    """Deterministic kernels everywhere, so that the same inputs give bit-identical results run after run.

    Returns the attention backend to use: 'auto' lets PyTorch pick fused kernels whose backward passes
    accumulate with atomics (flash, cuDNN, memory-efficient), so it becomes 'math'."""
    # cuBLAS reads this when it creates its handle: before the first matmul on this process's GPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return "math" if attention == "auto" else attention


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


@dataclass(frozen=True)
class CpuThreads:
    """torch's CPU thread count and what it was chosen from."""

    threads: int
    cores: int  # the cores the process may use: its CPU affinity, or the CPUs Ray reserved for a worker
    busy: int = 0  # of those, the cores other processes kept busy when it was chosen
    requested: bool = False  # the user named the count

    def describe(self, option: str = "--threads") -> str:
        """'cpu: 1 thread (of 2 cores, 1 busy with other processes; --threads N to change)'."""
        cores = f"of {plural(self.cores, 'core')}"
        if self.requested:
            return f"cpu: {plural(self.threads, 'thread')} ({cores}; set by {option})"
        busy = f", {self.busy} busy with other processes" if self.busy else ""
        return f"cpu: {plural(self.threads, 'thread')} ({cores}{busy}; {option} N to change)"


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def cpu_threads(cores: int, busy: float = 0.0, requested: int | None = None) -> CpuThreads:
    """One thread per core that no other process keeps busy (at least one); `requested` wins. A core
    counts as busy when other processes use half of it or more. A Ray worker's cores are its reservation,
    which it does not share (busy=0): its count, and so its numerics, are the same run after run.

    Why not every core: torch's OpenMP threads meet at a barrier after each parallel operator, and the
    waiting ones spin on their cores. A thread that shares its core with another process waits for its
    time slice there (the spinners keep the other cores looking busy, so the scheduler does not move
    it), and every operator waits with it: a step becomes many times slower, not a little.
    benchmarks/cpu_results.md has the measurements."""
    cores = max(1, int(cores))
    if requested:
        return CpuThreads(requested, cores, requested=True)
    taken = min(cores - 1, int(busy + 0.5))
    return CpuThreads(cores - taken, cores, taken)


def process_cores() -> list[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cpu_times(cores: list[int]) -> dict[int, tuple[int, int]] | None:
    """(busy, total) clock ticks of each of `cores` since boot, from /proc/stat; None where there is none."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    times = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
            ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
            times[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return times


def busy_cores(cores: list[int], seconds: float = 0.2) -> float:
    """How many of `cores` other processes keep busy: their busy share over `seconds`, while this process
    sleeps. 0 where the system does not say (no /proc/stat)."""
    before = cpu_times(cores)
    time.sleep(seconds)
    after = cpu_times(cores)
    if not before or not after:
        return 0.0
    shares = ((after[c][0] - before[c][0]) / max(1, after[c][1] - before[c][1]) for c in after if c in before)
    return sum(shares)


def choose_cpu_threads(requested: int | None = None) -> CpuThreads:
    """The thread count of a process that shares the machine with whatever else runs (raygpt.bench,
    raygpt.sample): cpu_threads over this process's cores, less those busy right now."""
    cores = process_cores()
    return cpu_threads(len(cores), 0.0 if requested else busy_cores(cores), requested)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's CPU thread count set for a block, then set back: a CLI's main() may run inside another program."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# What each compile mode beyond 'default' needs of a GPU.
GPU_COMPILE_MODES = {
    "reduce-overhead": "CUDA graphs",
    "max-autotune": "CUDA graphs and GPU kernel tuning",
    "max-autotune-no-cudagraphs": "GPU kernel tuning",
}


def compile_mode_for(mode: str, device_type: str) -> tuple[str, str | None]:
    """The torch.compile mode to use on `device_type`, and a one-line notice where it is not `mode`. The
    modes beyond 'default' are for GPUs; elsewhere the model compiles in the default mode (a config
    written for a GPU still runs on a CPU), and the notice says so."""
    if device_type == "cuda" or mode not in GPU_COMPILE_MODES:
        return mode, None
    return "default", (
        f"compile_mode={mode} uses {GPU_COMPILE_MODES[mode]}, which need a GPU: compiling for the "
        f"{device_type.upper()} in the default mode"
    )


def compile_notices(mode: str, device_type: str, skip: str = "--compile=False") -> list[str]:
    """What a process says as it starts to compile: the mode it compiles in (compile_mode_for), and on a
    CPU that the compile takes long, with `skip`, the option that turns it off."""
    notice = compile_mode_for(mode, device_type)[1]
    if device_type == "cuda":
        return ["compiling the model... (takes a ~minute)"]
    return [
        *([notice] if notice else []),
        f"compiling the model (torch.compile on CPU can take minutes; {skip} to skip)",
    ]


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


@dataclass
class WrappedModel:
    module: torch.nn.Module  # the plain model: its parameters and state_dict
    train: torch.nn.Module
    eval: torch.nn.Module
    # Called with True on a step's last micro-step and False before it: gradients are synchronized
    # (all-reduced, reduce-scattered) once per step, not at every micro-step. None: nothing to sync.
    set_gradient_sync: Callable[[bool], None] | None
    cuda_graphs: bool  # each forward must be marked as a new CUDA-graph step
    sharded: bool  # FSDP: each rank holds a shard of every parameter


def recompute_layers(mode: str, n_layer: int) -> frozenset[int]:
    """Blocks whose activations are recomputed in backward: none, full (all), selective (every other)."""
    step = {"none": 0, "full": 1, "selective": 2}[mode]
    return frozenset(range(0, n_layer, step)) if step else frozenset()


def wrap_model(model: torch.nn.Module, cfg, world_size: int, device: torch.device, dtype: str) -> WrappedModel:
    """Activation checkpointing, compile (cfg.compile, compile_mode, compile_regions), then DDP when
    world_size > 1, or FSDP2 with parallelism=fsdp."""
    model.recompute_layers = recompute_layers(cfg.activation_checkpointing, len(model.transformer.h))
    if cfg.fp8:  # FP8 Linears first: compile traces them and DDP or FSDP wraps their (unchanged) Parameters
        convert_linears(model, device, dtype)
    mode, _ = compile_mode_for(cfg.compile_mode, device.type)
    cuda_graphs = cfg.compile and uses_cuda_graphs(mode, device.type)
    if cfg.parallelism == "fsdp":
        return shard_model(model, cfg, mode, dtype, cuda_graphs, device)
    # torch.compile meets DDP here. Split at the buckets, each piece is its own compile, and AOTAutograd's
    # cache refuses them (they are traced on fake inputs first), so every process traces them again; one
    # graph all-reduces after its backward instead. benchmarks/RESULTS.md has both measured.
    if cfg.compile:  # torch._dynamo's import alone takes seconds: only a compiled run pays it
        torch._dynamo.config.optimize_ddp = "ddp_optimizer" if cfg.ddp_split_graphs else "no_optimization"
    compiled = compile_model(model, mode, cfg.compile_regions) if cfg.compile else model
    if world_size == 1:
        return WrappedModel(model, compiled, compiled, None, cuda_graphs, sharded=False)
    ddp = DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None)

    def set_gradient_sync(enabled: bool) -> None:
        ddp.require_backward_grad_sync = enabled  # DDP's own switch; no_sync() as a flag

    return WrappedModel(model, ddp, compiled, set_gradient_sync, cuda_graphs, sharded=False)


def shard_model(
    model: torch.nn.Module, cfg, mode: str, dtype: str, cuda_graphs: bool, device: torch.device
) -> WrappedModel:
    """FSDP2: each transformer block is one unit of sharding (its weights are gathered just before its
    forward and backward and freed after), then the root holds the embeddings, final LayerNorm and head.
    Blocks are compiled one by one before sharding, as torch.compile and FSDP2 expect. Parameters are
    computed in bfloat16 (dtype=bfloat16) with gradients reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[dtype], reduce_dtype=torch.float32)
    blocks = model.transformer.h
    for i, block in enumerate(blocks):
        if cfg.compile:
            block.compile(mode=None if mode == "default" else mode, dynamic=False)
        # The last block's backward comes right after its forward: resharding it would only gather it again.
        reshard = cfg.fsdp_reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mp_policy=policy)

    def set_gradient_sync(enabled: bool) -> None:
        # Between micro-steps keep gradients unreduced and weights gathered: one reduce-scatter and no
        # re-gather per step, for the memory of one unsharded copy of the weights and gradients.
        model.set_requires_gradient_sync(enabled)
        model.set_reshard_after_backward(enabled)

    # That copy (bf16 weights, fp32 gradients) must be small beside the device's memory; otherwise every
    # micro-step reduce-scatters its gradients and frees the gathered weights, as FSDP does by default.
    unsharded_copy = sum(p.numel() for p in model.parameters()) * (PARAM_DTYPES[dtype].itemsize + 4)
    fits = unsharded_copy < UNSHARDED_COPY_LIMIT * device_memory(device)[0]
    return WrappedModel(model, model, model, set_gradient_sync if fits else None, cuda_graphs, sharded=True)


def weights_in_sync(wrapped: WrappedModel, world_size: int) -> bool | None:
    """Data parallelism keeps every rank's weights identical; compare a cheap fingerprint to prove it.
    A collective: every rank calls it. None under FSDP, where ranks hold different shards by design."""
    if wrapped.sharded:
        return None
    with torch.no_grad():
        fingerprint = torch.stack([p.detach().double().sum() for p in wrapped.module.parameters()]).sum()
    if world_size == 1:
        return True
    fingerprints = [torch.zeros_like(fingerprint) for _ in range(world_size)]
    torch.distributed.all_gather(fingerprints, fingerprint)
    return all(torch.equal(f, fingerprints[0]) for f in fingerprints)


def largest_over_ranks(value: int, world_size: int, device: torch.device) -> int:
    """The largest of `value` over the ranks (every rank calls it)."""
    if world_size == 1:
        return value
    values = torch.tensor([value], device=device)
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return int(values.item())


class CommunicatorWarmup:
    """NCCL makes a process group's communicator at its first collective, which blocks that rank until
    every rank has joined (DDP's first broadcast in the wrap, FSDP's first all-gather). start() makes it
    now, in a thread: the collective releases the GIL, so the checkpoint read and the model build go on
    meanwhile. wait() before any other collective: the warm-up must be each rank's first."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled = device, enabled
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @classmethod
    def for_worker(cls, world_size: int, device: torch.device) -> CommunicatorWarmup:
        """Gloo connects at init_process_group: only an NCCL group has anything left to make."""
        nccl = world_size > 1 and dist.is_initialized() and dist.get_backend() == "nccl"
        return cls(device, enabled=nccl and device.type == "cuda")

    def start(self) -> None:
        if self.enabled:
            # A daemon: a rank stuck here because a peer died must not keep its process alive.
            self.thread = threading.Thread(target=self._warm, name="communicator-warmup", daemon=True)
            self.thread.start()

    def _warm(self) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # the current device is per thread
            one = torch.ones(1, device=self.device)
            dist.all_reduce(one)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except BaseException as error:  # noqa: BLE001 - raised again by wait(), in the loop's thread
            self.error = error

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error
