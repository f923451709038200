"""One training step, shared by the training loop, raygpt.bench and raygpt.sample, and nanoGPT's
learning-rate schedule (`get_lr`).

Device and precision set up once (`Precision`), gradients of one iteration over its micro-batches
(`forward_backward`), and the optimizer step guarded against non-finite gradients (`NonFiniteGuard`).
No Ray here.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext

import torch

from raygpt.core.parallel import WrappedModel
from raygpt.errors import RaygptError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PrecisionError(RaygptError, RuntimeError):
    """A dtype this device cannot train in; the message is one line."""


def resolve_dtype(name: str, device: torch.device) -> str:
    """'auto' -> bfloat16 where the GPU supports it, else float16 on CUDA, float32 on CPU."""
    if device.type != "cuda":
        return "float32" if name == "auto" else name
    bf16_ok = torch.cuda.is_bf16_supported()
    if name == "auto":
        return "bfloat16" if bf16_ok else "float16"
    if name == "bfloat16" and not bf16_ok:
        raise PrecisionError(
            f"dtype bfloat16 is not supported by {torch.cuda.get_device_name(device)}; use --dtype=float16"
        )
    return name


class Precision:
    """The dtype a device computes in: the autocast context for forward passes, and (float16 only) the
    gradient scaler that keeps small gradients from flushing to zero."""

    def __init__(self, dtype: str, device: torch.device | str):
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == "float16")
        # One context object, entered at every forward (entering it again is how nanoGPT uses it too).
        self._autocast = (
            nullcontext()
            if self.dtype == "float32"
            else torch.amp.autocast(device_type=self.device.type, dtype=DTYPES[self.dtype])
        )

    def autocast(self):
        return self._autocast


class NonFiniteGuard:
    """Skips optimizer steps whose loss or gradients are not finite, and stops a run stuck on them.

    Both ways of detecting one live here. Fused AdamW (CUDA) takes the decision on the device, so the
    host never waits for the GPU; other optimizers check on the host. Either way the counts are read only
    at `check()` (log and eval steps), which prints the one warning and raises after `max_in_a_row`."""

    def __init__(self, max_in_a_row: int, device: torch.device, out_dir: str = "", announce: bool = True):
        self.max_in_a_row, self.out_dir, self.announce = max_in_a_row, out_dir, announce
        self.in_a_row = torch.zeros((), device=device)  # skipped steps since the last good one
        self.since_check = torch.zeros((), device=device)  # skipped steps since the last check()
        self.skipped = 0  # skipped steps of this process, as of the last check()

    def step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_norm: torch.Tensor) -> None:
        if scaler.is_enabled():
            scaler.step(optimizer)  # it skips a step with inf/nan gradients itself and lowers its scale
            # An overflow at a healthy scale is float16 working as designed; at a scale below 1 the
            # gradients are non-finite however small the scale gets: that is divergence.
            skipped = float(not torch.isfinite(grad_norm) and scaler.get_scale() < 1.0)
        elif getattr(optimizer, "_step_supports_amp_scaling", False):
            # Fused AdamW skips its update (step count included) when found_inf is set, as under GradScaler.
            skipped = (~torch.isfinite(grad_norm)).float()
            optimizer.found_inf = skipped
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        else:
            skipped = float(not torch.isfinite(grad_norm))
            if not skipped:
                optimizer.step()
        if isinstance(skipped, torch.Tensor):  # decided on the device: keep it there
            self.in_a_row.copy_(torch.where(skipped > 0, self.in_a_row + 1, 0.0))
            self.since_check.add_(skipped)
        elif skipped:
            self.in_a_row.add_(1)
            self.since_check.add_(1)
        else:
            self.in_a_row.zero_()

    def streak(self) -> int:
        """The non-finite steps in a row up to now, without check()'s warning or stop: what a checkpoint on
        notice asks before saving (every rank gets the same answer: the norm is of the all-reduced gradients)."""
        return int(self.in_a_row)

    def counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The device counts check() reads, for a caller that reads them with its own values in one transfer."""
        return self.in_a_row, self.since_check

    def check(self, iter_num: int, counts: list[float] | None = None) -> int:
        """Warn about steps skipped since the last check; raise after too many in a row. Returns the streak.
        `counts`: counts() as already read to the host; None reads them here."""
        if counts is None:
            counts = torch.stack(self.counts()).tolist()
        in_a_row, since = (int(v) for v in counts)
        self.since_check.zero_()
        self.skipped += since
        if since and self.announce:
            print(
                f"warning: iter {iter_num}: {since} step(s) skipped for a non-finite loss or gradient norm "
                f"({in_a_row} in a row)",
                flush=True,
            )
        if self.max_in_a_row and in_a_row >= self.max_in_a_row:
            raise FloatingPointError(
                f"{in_a_row} consecutive steps with a non-finite loss or gradient at iter {iter_num}; stopping"
                f" (the last good checkpoint is in {self.out_dir}); lower learning_rate or use bfloat16"
            )
        return in_a_row


def is_dtensor(value) -> bool:
    """isinstance(value, DTensor) without importing torch.distributed.tensor, most of the import time of
    raygpt.worker.loop, which the launcher pays before Ray starts the run: only FSDP makes DTensors, and it has
    imported the module by then."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether training draws random numbers: GPT's attention and residual dropout share config.dropout."""
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def default_generator(device: torch.device) -> torch.Generator:
    """The generator that dropout (eager or compiled) draws from on `device`. Seeding it alone takes
    microseconds; torch.manual_seed, which seeds every backend's, takes a hundred on a CPU."""
    if device.type == "cuda":
        return torch.cuda.default_generators[torch.cuda.current_device() if device.index is None else device.index]
    return torch.default_generator


def get_lr(it: int, cfg) -> float:
    """nanoGPT's schedule: linear warmup, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        # nanoGPT uses `>`; at it == lr_decay_iters the cosine is already at min_lr, and `>=` also
        # avoids its division by zero when warmup_iters == lr_decay_iters.
        return cfg.min_lr
    decay_ratio = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


class TrainStep:
    """One iteration: forward/backward over the micro-batches, clip, guarded optimizer step, zero grads.

    Forward and backward run on `wrapped.train` (compiled, wrapped for data parallelism); gradients are
    clipped over the plain model's parameters. A model with dropout reseeds its device's generator
    before each micro-step with `batches.dropout_seed`, so the dropout masks of a global micro-batch do
    not depend on which rank runs it (eager, compiled and CUDA-graph code all read the generator at each
    call: checked on an H200). Without dropout nothing is reseeded."""

    def __init__(self, wrapped: WrappedModel, optimizer, precision: Precision, batches, accum_steps: int,
                 grad_clip: float, guard: NonFiniteGuard):  # fmt: skip
        self.wrapped, self.optimizer, self.precision, self.batches = wrapped, optimizer, precision, batches
        self.accum_steps, self.grad_clip, self.guard = accum_steps, grad_clip, guard
        self.params = list(wrapped.module.parameters())
        self.dropout_generator = default_generator(precision.device) if has_dropout(wrapped.module) else None

    def __call__(self, X, Y, iter_num: int):
        """Train on (X, Y) and the iteration's other micro-batches. Returns the summed (already
        1/accum_steps-scaled) loss, the gradient norm, and the first batch of the next iteration, which
        was fetched while the device worked on this one."""
        scaler = self.precision.scaler
        loss_sum = torch.zeros((), device=X.device)
        model = self.wrapped.train
        for micro_step in range(self.accum_steps):
            if self.wrapped.set_gradient_sync is not None:
                # Gradients are synchronized only on the last micro-step; earlier ones just accumulate.
                self.wrapped.set_gradient_sync(micro_step == self.accum_steps - 1)
            if (
                self.dropout_generator is not None
                and (seed := self.batches.dropout_seed(iter_num, micro_step)) is not None
            ):
                self.dropout_generator.manual_seed(seed)
            if self.wrapped.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # each micro-step replays the graphs afresh
            with self.precision.autocast():
                _, loss = model(X, Y)
                loss = loss / self.accum_steps
            loss_sum += loss.detach()
            # Fetch the next batch while the GPU is still busy with this one.
            if micro_step + 1 < self.accum_steps:
                X, Y = self.batches.train_batch(iter_num, micro_step + 1)
            else:
                X, Y = self.batches.train_batch(iter_num + 1, 0)
            scaler.scale(loss).backward()
        scaler.unscale_(self.optimizer)
        with_grad = [p for p in self.params if p.grad is not None]
        if self.grad_clip > 0.0:
            grad_norm = torch.nn.utils.clip_grad_norm_(with_grad, self.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
        if is_dtensor(grad_norm):  # sharded parameters (FSDP): the norm is replicated on every rank
            grad_norm = grad_norm.full_tensor()
        self.guard.step(self.optimizer, scaler, grad_norm)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, grad_norm, X, Y


def eval_group_size(n_batches: int, batch_size: int, block_size: int, vocab_size: int, n_embd: int) -> int:
    """How many eval batches to run as one forward pass.

    A small model is launch-bound: 200 eval batches of 64 x 256 tokens cost 200 launches of a few
    milliseconds each, while one pass over 10 of them costs barely more than one. The group is bounded
    so its largest activation (logits or the MLP's hidden layer) stays under 2**28 elements, and it
    divides n_batches so every pass has the same shape (no recompiles). GPT-2 sizes stay at 1."""
    largest_row = batch_size * block_size * max(vocab_size, 4 * n_embd)
    limit = max(1, min(n_batches, (1 << 28) // largest_row))
    return max(g for g in range(1, limit + 1) if n_batches % g == 0)


class Evaluator:
    """nanoGPT's estimate_loss: the mean loss over the fixed eval windows of each split.

    Each rank takes every world_size-th window and the per-window losses are summed across ranks, so
    the result does not depend on the worker count. Small models run several windows as one forward
    pass (eval_group_size). Under FSDP each forward gathers weights from every rank, so every rank
    makes the same number of forward passes: one with fewer windows than the others (eval_iters not a
    multiple of the worker count) makes extra passes whose losses it does not count."""

    def __init__(self, wrapped: WrappedModel, batches, precision: Precision, eval_iters: int, model_args: dict,
                 rank: int, world_size: int, eager: bool = False, before_compile=None):  # fmt: skip
        self.model, self.batches, self.precision = wrapped.eval, batches, precision
        self.eval_iters, self.world_size = eval_iters, world_size
        self.my_windows = list(range(rank, eval_iters, world_size))
        most_windows = -(-eval_iters // world_size)  # what the first rank gets
        sized_by = most_windows if wrapped.sharded else len(self.my_windows)
        self.group = eval_group_size(sized_by, batches.batch_size, model_args["block_size"],
                                     model_args["vocab_size"], model_args["n_embd"])  # fmt: skip
        passes = -(-len(self.my_windows) // self.group)
        self.uncounted_passes = -(-most_windows // self.group) - passes if wrapped.sharded else 0
        # eager: compiled for training, but evaluated without compiling a second graph (compile_eval=False).
        self.eager, self.cuda_graphs = eager, wrapped.cuda_graphs and not eager
        self.before_compile = before_compile  # called first: an eval graph compiled now needs compile workers
        self.seconds = 0.0  # how long the last evaluation took

    def _loss(self, split: str, windows: list[int]) -> torch.Tensor:
        X, Y = self.batches.eval_batch(split, windows)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with self.precision.autocast(), self._stance():
            _, loss = self.model(X, Y)
        return loss.float()

    def _stance(self):
        return torch.compiler.set_stance("force_eager") if self.eager else nullcontext()

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        start = time.time()
        if self.before_compile is not None:
            self.before_compile()
        self.model.eval()
        losses = {}
        for split in ("train", "val"):
            loss_sum = torch.zeros((), device=self.precision.device)
            for i in range(0, len(self.my_windows), self.group):
                windows = self.my_windows[i : i + self.group]
                # Equal-sized batches: their summed mean losses are the group's mean times its size.
                loss_sum += self._loss(split, windows) * len(windows)
            for _ in range(self.uncounted_passes):
                self._loss(split, [0])
            if self.world_size > 1:
                torch.distributed.all_reduce(loss_sum)
            losses[split] = loss_sum.item() / self.eval_iters
        self.model.train()
        self.seconds = time.time() - start
        return losses
