"""train_loop_per_worker: nanoGPT's training loop, run by every Ray Train worker (or, for a one-worker
Tune trial, by the trial itself: train_in_tune_trial; session.py says what differs).

Read top to bottom it is nanoGPT's train.py: set up the device and precision, build or restore the
model, then loop over eval -> checkpoint -> step -> log, with Ray taking the place of torchrun. Each
concern is one call into its owner: step.py (precision, the step, eval), parallel.py (compile, DDP),
checkpoint.py (TrainState, Checkpointer), metrics.py (console, WandB, ray.train.report).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from raygpt.config.schema import TrainConfig
from raygpt.core import checkpoint
from raygpt.core.checkpoint import Checkpointer, TrainState
from raygpt.core.data import Batches, NanoGPTOrderBatches, validate_dataset
from raygpt.core.memory import check_fits
from raygpt.core.model import GPT, GPTConfig
from raygpt.core.parallel import weights_in_sync, wrap_model
from raygpt.core.speed import set_attention_backend
from raygpt.core.step import Evaluator, NonFiniteGuard, Precision, TrainStep, enable_tf32, make_deterministic
from raygpt.core.tokenizer import PADDED_GPT2_VOCAB_SIZE, load_meta
from raygpt.processes import CompileWorkers, exit_waits_for_block, process_started_at
from raygpt.storage.datasets import dataset_uri, default_cache_root, stage_dataset
from raygpt.storage.uri import is_uri, join_uri, storage_root
from raygpt.worker import session
from raygpt.worker.compile import CompileCache, cache_writer, graph_settings
from raygpt.worker.preemption import KV_NAMESPACE, PreemptionWatch, launcher_asked_to_stop, notice_metrics
from raygpt.worker.process_group import CommunicatorWarmup
from raygpt.worker.reporting import Reporter, start_wandb


def get_lr(it: int, cfg: TrainConfig) -> float:
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


def build_model(cfg: TrainConfig, meta: dict | None, saved: dict | None, precision: Precision) -> tuple[GPT, dict]:
    """The GPT to train, shaped as the checkpoint's, GPT-2's, or the config's; and its model_args.

    A checkpoint's weights are loaded by TrainState; the launcher has already refused a config whose
    architecture conflicts with the checkpoint's. A run that cannot fit is refused before any allocation."""
    if saved is not None:
        model_args = checkpoint.architecture(saved, "checkpoint")
    elif cfg.init_from == "scratch":
        vocab_size = meta["vocab_size"] if meta else PADDED_GPT2_VOCAB_SIZE
        model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                          bias=cfg.bias, vocab_size=vocab_size)  # fmt: skip
    else:
        model = GPT.from_pretrained(cfg.init_from, dict(dropout=cfg.dropout))
        model_args = {key: getattr(model.config, key) for key in checkpoint.ARCHITECTURE_KEYS}
    if cfg.check_memory:
        check_fits({**model_args, "block_size": min(cfg.block_size, model_args["block_size"])}, cfg.batch_size,
                   precision.dtype, precision.device)  # fmt: skip
    if saved is not None:  # the checkpoint's weights replace any init: skip it
        model = GPT.uninitialized(GPTConfig(**model_args, dropout=cfg.dropout), precision.device)
    elif cfg.init_from == "scratch":
        model = GPT(GPTConfig(**model_args, dropout=cfg.dropout))
    model_args["dropout"] = cfg.dropout
    if cfg.block_size < model.config.block_size and saved is None:
        model.crop_block_size(cfg.block_size)
        model_args["block_size"] = cfg.block_size
    return model, model_args


def worker_device(cfg: TrainConfig, use_gpu: bool, gpu: Callable[[], torch.device]) -> torch.device:
    attention = make_deterministic(cfg.attention) if cfg.deterministic else cfg.attention
    if not use_gpu:
        return torch.device("cpu")
    device = gpu()
    torch.cuda.set_device(device)
    enable_tf32()
    set_attention_backend(attention)
    return device


def worker_cpu_count(cpus_per_worker: float) -> int:
    """The CPUs this worker may use; Ray sets OMP_NUM_THREADS=1, which would leave torch on one thread."""
    if cpus_per_worker:  # what the launcher reserved (in local mode: this machine's CPUs)
        return max(1, int(cpus_per_worker))
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def find_resume(cfg: TrainConfig, resume_from: str | None, ray_checkpoint, say) -> tuple[dict | None, str | None]:
    """A Ray checkpoint (a restart or a rerun of the run) wins, then the out_dir/ckpt.pt the launcher chose."""
    if ray_checkpoint is None and resume_from is None and cfg.init_from != "resume":
        return None, None
    fallback = Path(resume_from or Path(cfg.out_dir) / checkpoint.CKPT_NAME)
    return checkpoint.load_resume_state(ray_checkpoint, fallback, warn=say)


def local_dataset(cfg: TrainConfig, say) -> Path:
    """The dataset folder this worker memmaps: data_dir itself, or for a URI this node's copy of it
    (staged once per node; the other workers of the node wait for it), checked as the launcher checks
    local data."""
    if not is_uri(cfg.data_dir):
        return Path(cfg.data_dir) / cfg.dataset
    local = stage_dataset(dataset_uri(cfg.data_dir, cfg.dataset), default_cache_root(), progress=say)
    validate_dataset(local, cfg.block_size, load_meta(local)["vocab_size"])
    return local


def open_compile_cache(cfg: TrainConfig, device, model_args: dict, world_size: int, writer: bool, warn):
    """The run's compile cache, loaded before the first (lazy) compile; None with compile or the cache off."""
    if not (cfg.compile and cfg.compile_cache):
        return None
    settings = graph_settings(cfg, model_args, world_size)
    cache = CompileCache(storage_root(cfg.storage_path), device, settings, writer=writer, warn=warn)
    cache.load()
    return cache


RESTART_AFTER_S = 600  # a worker group starting this long after the launcher was restarted by Ray


def first_worker_group(launch_id: str) -> bool | None:
    """Whether no worker group of this launch started before this one (Ray restarts the group after a
    failure): the first to mark the launch in Ray's key-value store. None where that cannot be asked
    (local mode; a private Ray API, which may move)."""
    if not launch_id:
        return None
    try:
        from ray.experimental.internal_kv import _internal_kv_put

        return not _internal_kv_put(f"started-{launch_id}", b"1", overwrite=False, namespace=KV_NAMESPACE)
    except Exception:  # noqa: BLE001 - only the start-up line's wording depends on it
        return None


class Laps:
    """The seconds each named part of the worker's set-up took, for the start-up line."""

    def __init__(self, start: float):
        self.last, self.parts = start, []

    def __call__(self, name: str) -> None:
        now = time.time()
        self.parts.append((name, now - self.last))
        self.last = now

    def summary(self, shortest_s: float = 0.05) -> str:
        return ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.parts if seconds >= shortest_s)


def failure_seen_at(launch_id: str) -> float | None:
    """When Ray Train saw this launch's last worker group fail (process_group.FailureClock), taken once:
    a group restarted for another reason (an elastic resize) finds none. None where unknown."""
    if not launch_id:
        return None
    try:
        from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get

        from raygpt.worker.process_group import failure_key

        seen = _internal_kv_get(failure_key(launch_id), namespace=KV_NAMESPACE)
        if seen is None:
            return None
        _internal_kv_del(failure_key(launch_id), namespace=KV_NAMESPACE)
        return float(seen)
    except Exception:  # noqa: BLE001 - a private Ray API; only the start-up line depends on it
        return None


def startup_line(plan: dict, worker_started: float, ready: float, first_step_done: float,
                 peak_gib: float | None = None, first_group: bool | None = None, parts: str = "",
                 process_started: float | None = None, failed_at: float | None = None) -> str:  # fmt: skip
    """Where the time to the first step went, and on a GPU the training step's memory peak, known before
    a long run goes on; `parts` breaks "model and data" down (Laps.summary).
    A worker group restarted after a failure (first_group False) counts from the failure Ray Train saw
    (failed_at) and from its worker process's start, where known; when first_group is unknown (None), a
    group starting long after the launcher was ready is taken for a restart."""
    model = (
        f"model and data {ready - worker_started:.1f}s, first eval and step (compile) {first_step_done - ready:.1f}s"
    )
    if peak_gib is not None:
        model += f"; peak memory {peak_gib:.2f} GiB"
    if parts:
        model += f"; model and data: {parts}"
    since_ray = worker_started - plan.get("ray_ready_at", 0.0)
    if first_group is None:
        first_group = 0 <= since_ray < RESTART_AFTER_S
    if not plan.get("launched_at") or not first_group:
        if process_started is not None and process_started <= worker_started:
            model = f"worker process to the loop {worker_started - process_started:.1f}s, {model}"
            if failed_at is not None and failed_at <= process_started:
                model = f"failure seen to the new worker process {process_started - failed_at:.1f}s, {model}"
                return f"start-up after a restart {first_step_done - failed_at:.1f}s: {model}"
        return f"start-up after a restart: {model}"
    ray_parts = {"launcher checks and Ray": plan["ray_ready_at"] - plan["launched_at"], "worker group": since_ray}
    # A Tune trial training in its own process has neither a launcher nor a worker group of its own.
    shown = [f"{name} {seconds:.1f}s" for name, seconds in ray_parts.items() if seconds >= 0.05]
    return f"start-up {first_step_done - plan['launched_at']:.1f}s: {', '.join([*shown, model])}"


def largest_over_ranks(value: int, world_size: int, device: torch.device) -> int:
    """The largest of `value` over the ranks (every rank calls it)."""
    if world_size == 1:
        return value
    values = torch.tensor([value], device=device)
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return int(values.item())


@dataclass
class FirstSteps:
    """What the loop does once, in its first steps: share the newly compiled graphs (after the first),
    say where start-up time went (after the second, whose backward ran beside the optimizer state the
    first allocated: its memory peak is the training step's), and stop the compile workers (after the
    third, when forward and backward are compiled)."""

    plan: dict
    worker_started: float
    ready: float  # the model, optimizer and data are set up; the first eval and step come next
    device: torch.device
    compile_cache: CompileCache | None
    compile_workers: CompileWorkers
    first_group: bool | None
    say: Callable
    laps: Laps
    first_step_done: float = 0.0

    def after_step(self, local_iter_num: int, now: float, last: bool) -> None:
        if local_iter_num == 1:
            self.first_step_done = now
            if self.compile_cache is not None:
                self.compile_cache.save()  # the training step (and a fresh run's first eval) are compiled now
                self.say(self.compile_cache.summary(), flush=True)
        if local_iter_num == 2 or (local_iter_num == 1 and last):
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
            failed_at = failure_seen_at(self.plan.get("launch_id", "")) if self.first_group is False else None
            line = startup_line(self.plan, self.worker_started, self.ready, self.first_step_done, peak,
                                self.first_group, self.laps.summary(), process_started_at(), failed_at)  # fmt: skip
            self.say(line, flush=True)
        if local_iter_num == 3:
            self.compile_workers.stop_in_background()


def train_loop_per_worker(loop_config: dict) -> None:
    """A Ray Train worker's training function (raygpt.launch.build_trainer)."""
    run_loop(loop_config, session.train_worker())


TRIAL_EXIT_WAIT_S = 10.0  # at most, for a stopped trial's loop to end before its process does


def train_in_tune_trial(loop_config: dict) -> None:
    """A one-worker Tune trial's training, in the trial's own process (raygpt.tune).

    Tune ends a process it will not reuse (the sweep's last trial, a stopped one) right after it sets
    the trial's stop event, while the loop, in Tune's daemon thread, may be inside a torch call. Python's
    exit then stops that thread as it takes the GIL back, which aborts the process with a fatal error
    and a stack on the user's console. The exit waits for the loop, which ends at its next iteration."""
    with exit_waits_for_block(TRIAL_EXIT_WAIT_S):
        run_loop(loop_config, session.tune_trial())


def run_loop(loop_config: dict, ray_session: session.RaySession) -> None:
    worker_started = time.time()
    laps = Laps(worker_started)
    cfg, plan = TrainConfig.from_dict(loop_config["config"]), loop_config["plan"]
    rank, world_size = ray_session.world_rank, ray_session.world_size
    is_rank_zero = rank == 0
    say = print if is_rank_zero else lambda *args, **kwargs: None
    first_group = first_worker_group(plan.get("launch_id", "")) if is_rank_zero else None
    device = worker_device(cfg, plan["use_gpu"], ray_session.gpu)
    torch.set_num_threads(worker_cpu_count(plan["cpus_per_worker"]))
    laps("device")
    communicator = CommunicatorWarmup.for_worker(world_size, device)
    communicator.start()  # NCCL's set-up runs while the data is checked and the model built
    compile_workers = CompileWorkers(enabled=cfg.compile and device.type == "cuda")
    compile_workers.start()  # they boot while the model, optimizer and data are set up
    precision = Precision(cfg.dtype, device)
    # gradient_accumulation_steps is the global count, as with nanoGPT under torchrun.
    accum_steps = max(1, cfg.gradient_accumulation_steps // world_size)  # divisibility: checked by the launcher
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # on every node: a rank's files never rely on another's disk
    # The first worker of each node says how staging a dataset from object storage goes.
    dataset_dir = local_dataset(cfg, print if ray_session.local_rank == 0 else lambda *args, **kwargs: None)
    say(f"tokens per iteration will be: {tokens_per_iter:,}", flush=True)
    laps("data")

    # ---- model and train state: from a checkpoint, GPT-2's weights or scratch --------------------
    saved, source = find_resume(cfg, plan["resume_from"], ray_session.checkpoint, say)
    laps("checkpoint read")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model, model_args = build_model(cfg, load_meta(dataset_dir), saved, precision)
    model.to(device)
    laps("model")
    # Graphs compiled by an earlier process of this run, a rerun or another trial, shared through storage.
    writer = cache_writer(rank, ray_session.local_rank, device)
    compile_cache = open_compile_cache(cfg, device, model_args, world_size, writer=writer, warn=say)
    laps("compile cache")
    communicator.wait()  # before the wrap's first collective
    laps("communicator")
    if cfg.compile:
        say("compiling the model... (takes a ~minute)", flush=True)
    wrapped = wrap_model(model, cfg, world_size, device, precision.dtype)  # before the optimizer: FSDP shards
    laps("wrap")
    betas = (cfg.beta1, cfg.beta2)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, betas, device.type, is_rank_zero)
    nanogpt_order = cfg.data_order == "nanogpt"
    state = TrainState(model, optimizer, precision.scaler, model_args, cfg.to_dict(), nanogpt_order, wrapped.sharded)
    resumed_batch = state.load_state_dict(saved, source) if saved is not None else None
    saved = None  # free the checkpoint's copy of the weights
    laps("optimizer and state")
    if source is not None:
        say(
            f"resuming from {source} at iter {state.iter_num} (best val loss {state.best_val_loss:.4f}) "
            f"with {world_size} worker{'s' if world_size > 1 else ''}",
            flush=True,
        )

    if nanogpt_order and world_size > 1:  # the launcher refuses this; Tune or a custom trainer might not
        raise ValueError(f"data_order=nanogpt needs one worker, not {world_size}")
    batch_source = NanoGPTOrderBatches if nanogpt_order else Batches
    batches = batch_source(
        dataset_dir, model_args["block_size"], cfg.batch_size, cfg.seed, rank, world_size, device, accum_steps
    )
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, device, str(out_dir), announce=is_rank_zero)
    train_step = TrainStep(wrapped, optimizer, precision, batches, accum_steps, cfg.grad_clip, guard)
    estimate_loss = Evaluator(wrapped, batches, precision, cfg.eval_iters, model_args, rank, world_size,
                              eager=cfg.compile and not cfg.compile_eval,
                              before_compile=compile_workers.ready_for_compile)  # fmt: skip
    wandb_run = None
    if cfg.wandb_log and is_rank_zero:
        wandb_run, state.wandb_run_id = start_wandb(cfg, out_dir, state.wandb_run_id)
    mfu = lambda dt: model.estimate_mfu(cfg.batch_size * accum_steps, dt, device)  # noqa: E731
    reporter = Reporter(cfg, is_rank_zero, tokens_per_iter, mfu, device, wandb_run, report_to_ray=ray_session.report,
                        results_at=join_uri(storage_root(cfg.storage_path), plan["run_name"]))  # fmt: skip
    checkpointer = Checkpointer(out_dir, rank, sharded=wrapped.sharded, asynchronous=cfg.async_checkpoint,
                                checkpoint_type=ray_session.checkpoint_type)  # fmt: skip
    # Ray's preemption notice, polled at log cadence (a barrier: every rank polls the same iterations),
    # in the checkpointer's thread, in order with the reports (Ray numbers both kinds of collective).
    # SIGTERM to the launcher reaches the workers the same way, read from Ray's key-value store.
    stop_asked = None if cfg.local_mode else functools.partial(launcher_asked_to_stop, plan.get("launch_id", ""))
    watch = PreemptionWatch(ray_session.preemption_info, cfg.log_interval, checkpointer.in_order, reporter.say,
                            agree=functools.partial(largest_over_ranks, world_size=world_size, device=device),
                            stop_asked=stop_asked)  # fmt: skip

    # ---- the loop ---------------------------------------------------------------------------------
    X, Y = batches.train_batch(state.iter_num, 0) if resumed_batch is None else (t.to(device) for t in resumed_batch)
    start_iter, local_iter_num, t0 = state.iter_num, 0, time.time()
    laps("the rest")
    first_steps = FirstSteps(plan, worker_started, t0, device, compile_cache, compile_workers, first_group, say, laps)
    stopped = False  # by a Tune scheduler (ASHA): the trial ends now, reporting nothing more
    while True:
        if ray_session.stop_requested():
            stopped = True
            break
        lr = get_lr(state.iter_num, cfg)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr

        if state.iter_num % cfg.eval_interval == 0 or state.iter_num >= cfg.max_iters:
            # Never checkpoint weights that a run of non-finite steps left behind.
            nonfinite_streak = guard.check(state.iter_num - 1) if local_iter_num > 0 else 0
            # A resumed run starts at its checkpoint's iteration, whose eval was already reported.
            if state.iter_num != start_iter or source is None or cfg.eval_only:
                losses = estimate_loss()
                if compile_cache is not None and local_iter_num > 0:
                    compile_cache.save()  # a resumed run compiles eval here; nothing is written if nothing is new
                in_sync = weights_in_sync(wrapped, world_size)
                keep = nonfinite_streak == 0 and all(math.isfinite(v) for v in losses.values())
                wanted = state.record_eval(losses) or cfg.always_save_checkpoint
                wanted = wanted and state.iter_num > 0 and not cfg.eval_only
                report = functools.partial(reporter.to_ray, reporter.eval(state, lr, estimate_loss.seconds, in_sync))
                if wanted and keep:
                    checkpointer.save(state, (X, Y), report)  # reports once written
                else:
                    if wanted:
                        reporter.say(f"warning: iter {state.iter_num}: no checkpoint: non-finite losses or gradients "
                                     f"(the last good checkpoint stays in {out_dir})")  # fmt: skip
                    checkpointer.report(report)
        if cfg.eval_only or state.iter_num >= cfg.max_iters:
            break
        notice = watch.notice(state.iter_num)
        if notice is not None:  # a node is being reclaimed, or SIGTERM: checkpoint now, no eval
            metrics = notice_metrics(state, lr, tokens_per_iter, notice)
            checkpointer.save(state, (X, Y), functools.partial(reporter.to_ray, metrics))
            checkpointer.wait()
            # SIGTERM: raises Terminated; a preemption: waits for Ray's restart; the launcher's SIGTERM: ends
            watch.stop(state.iter_num)
            break

        loss_sum, _, X, Y = train_step(X, Y, state.iter_num)

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        state.iter_num += 1
        local_iter_num += 1
        if local_iter_num <= 3:
            first_steps.after_step(local_iter_num, t1, last=state.iter_num >= cfg.max_iters)
        if state.iter_num % cfg.log_interval == 0:
            guard.check(state.iter_num - 1)
            reporter.step(state.iter_num - 1, loss_sum.item(), lr, dt, state.last_eval["val"])
    try:
        checkpointer.close()  # the last checkpoint is written and reported before the run ends
    except SystemExit as stop:  # Tune ends a stopped trial in its report (code 0); the checkpoint is written
        if stop.code not in (0, None):
            raise
        stopped = True
    reporter.finish()
    if stopped:  # as Tune ends a stopped trial; a return would hand it one more result, which it never reads
        raise SystemExit(0)
