"""train_loop_per_worker: nanoGPT's training loop, run by every Ray Train worker (or, for a one-worker
Tune trial, by the trial itself: train_in_tune_trial; session.py says what differs).

Read top to bottom it is nanoGPT's train.py: `setup` is its "various inits" (the device and precision,
the data, the model built or restored, the optimizer) and returns one `Run`; `fit` is its loop: eval ->
checkpoint -> step -> log, with Ray taking the place of torchrun. Each concern is one call into its owner:
core.step (precision, the step, eval, the schedule), core.parallel (the device, compile, DDP),
core.checkpoint (TrainState), worker.checkpointer (writing), worker.reporting (console, WandB,
TensorBoard, ray.train.report), worker.preemption (stopping on notice). What runs once after the first
steps (the start-up line, the compile cache's save, the compile workers' stop) plugs into `StepHooks`.
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
from raygpt.core.checkpoint import TrainState
from raygpt.core.data import (
    Batches,
    DataError,
    NanoGPTOrderBatches,
    dataset_identity,
    validate_dataset,
    vocabulary_change,
)
from raygpt.core.memory import check_fits
from raygpt.core.model import GPT, GPTConfig
from raygpt.core.parallel import (
    CommunicatorWarmup,
    WrappedModel,
    compile_notices,
    cpu_threads,
    largest_over_ranks,
    setup_device,
    weights_in_sync,
    wrap_model,
)
from raygpt.core.step import Evaluator, NonFiniteGuard, Precision, TrainStep, get_lr
from raygpt.core.tokenizer import load_meta, read_meta, scratch_vocab_size
from raygpt.driver.plan import RunPlan
from raygpt.storage.datasets import dataset_uri, default_cache_root, stage_dataset
from raygpt.storage.uri import is_uri, join_uri, storage_root
from raygpt.worker.checkpointer import Checkpointer
from raygpt.worker.compile import CompileCache, Compiles, CompileWorkers, cache_writer, graph_settings
from raygpt.worker.preemption import (
    Notice,
    PreemptionWatch,
    launcher_asked_to_stop,
    notice_metrics,
    tell_launcher_not_saved,
)
from raygpt.worker.reporting import Reporter, Say, start_wandb
from raygpt.worker.session import OrderedRayCalls, RaySession, exit_waits_for_block, train_worker, tune_trial
from raygpt.worker.startup import Startup
from raygpt.worker.validation import (
    CheckpointEvals,
    checkpoint_evals,
    reporting_checkpoints_for_validation,
    runs_as_ray_tasks,
)


def build_model(cfg: TrainConfig, meta: dict | None, saved: dict | None, precision: Precision) -> tuple[GPT, dict]:
    """The GPT to train, shaped as the checkpoint's, GPT-2's, or the config's; and its model_args.

    A checkpoint's weights are loaded by TrainState; the launcher has already refused a config whose
    architecture conflicts with the checkpoint's. A run that cannot fit is refused before any allocation."""
    if saved is not None:
        model_args = checkpoint.architecture(saved, "checkpoint")
    elif cfg.init_from == "scratch":
        vocab_size = scratch_vocab_size(meta)
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
    """This worker's device (the GPU Ray gave it, or the CPU), set up as raygpt.bench sets its own."""
    if not use_gpu:
        device = torch.device("cpu")
    else:
        device = gpu()
        torch.cuda.set_device(device)
    setup_device(cfg, device)
    return device


def worker_cpu_count(cpus_per_worker: float) -> int:
    """The CPUs this worker may use; Ray sets OMP_NUM_THREADS=1, which would leave torch on one thread."""
    if cpus_per_worker:  # what the launcher reserved (in local mode: this machine's CPUs)
        return max(1, int(cpus_per_worker))
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def find_resume(cfg: TrainConfig, resume_from: str | None, ray_checkpoint, say) -> tuple[dict | None, str | None]:
    """Of Ray's checkpoint (a restart or a rerun of the run) and the one the launcher chose, the latest
    iteration: checkpoint.load_resume_state, the launcher's policy. This node's out_dir/ckpt.pt is read only
    as the last resort: on a cluster each node has its own out_dir, and another node's copy may be stale."""
    if ray_checkpoint is None and resume_from is None and cfg.init_from != "resume":
        return None, None
    last_resort = None if resume_from else Path(cfg.out_dir) / checkpoint.CKPT_NAME
    return checkpoint.load_resume_state(ray_checkpoint, resume_from, warn=say, last_resort=last_resort)


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


class StepHooks:
    """The loop's one hook point (levanter's hooks, keyed by step): what runs once after given steps of
    this process, called as hook(local_iter_num, now, last) in the order added. Past the last hooked step
    it costs the loop one comparison a step."""

    def __init__(self):
        self.hooks: list[tuple[frozenset[int], Callable[[int, float, bool], None]]] = []
        self.through = 0  # the last step any hook wants

    def add(self, hook: Callable[[int, float, bool], None], steps: tuple[int, ...]) -> None:
        self.hooks.append((frozenset(steps), hook))
        self.through = max(self.through, *steps)

    def __call__(self, local_iter_num: int, now: float, last: bool) -> None:
        if local_iter_num > self.through:
            return
        for steps, hook in self.hooks:
            if local_iter_num in steps:
                hook(local_iter_num, now, last)


@dataclass
class Run:
    """What setup() builds and fit() trains with: the run's collaborators, in one place."""

    cfg: TrainConfig
    session: RaySession
    say: Say  # rank 0's console
    state: TrainState  # the model, optimizer and counters that a checkpoint holds
    optimizer: torch.optim.Optimizer
    wrapped: WrappedModel
    guard: NonFiniteGuard
    train_step: TrainStep
    estimate_loss: Evaluator
    reporter: Reporter
    calls: OrderedRayCalls  # the one thread of Ray Train calls: writes, reports, preemption polls
    checkpointer: Checkpointer
    evals: CheckpointEvals  # the evals of each checkpoint: Ray's validation tasks, or in the loop
    watch: PreemptionWatch
    compiles: Compiles
    after_step: StepHooks
    first_batch: tuple
    source: str | None  # the checkpoint the run resumed from; None: a fresh start
    tokens_per_iter: int


@dataclass
class Trained:
    """The model as setup() built it, restored or fresh, before the loop's collaborators."""

    state: TrainState
    wrapped: WrappedModel
    optimizer: torch.optim.Optimizer
    compile_cache: CompileCache | None
    resumed_batch: tuple | None  # the next batch a checkpoint saved (nanoGPT's order), or None
    source: str | None


def setup(cfg: TrainConfig, plan: RunPlan, ray_session: RaySession, started: float | None = None) -> Run:
    """nanoGPT's "various inits": the device, the data, the model and optimizer (from a checkpoint, GPT-2's
    weights or scratch), and what the loop reports, checkpoints and polls with. `started`: the worker's
    start, where the start-up line counts from."""
    rank, world_size = ray_session.world_rank, ray_session.world_size
    say = Say(rank == 0)
    startup = Startup(plan, rank, say, time.time() if started is None else started)
    device = worker_device(cfg, plan.use_gpu, ray_session.gpu)
    torch.set_num_threads(cpu_threads(worker_cpu_count(plan.cpus_per_worker)).threads)
    startup.lap("device")
    communicator = CommunicatorWarmup.for_worker(world_size, device)
    communicator.start()  # NCCL's set-up runs while the data is checked and the model built
    compile_workers = CompileWorkers(enabled=cfg.compile and device.type == "cuda")
    compile_workers.start()  # they boot while the model, optimizer and data are set up
    precision = Precision(cfg.dtype, device)
    # gradient_accumulation_steps is the global count, as with nanoGPT under torchrun.
    accum_steps = max(1, cfg.gradient_accumulation_steps // world_size)  # divisibility: checked by the launcher
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)  # on every node: a rank's files never rely on another's
    # The first worker of each node says how staging a dataset from object storage goes.
    dataset_dir = local_dataset(cfg, Say(ray_session.local_rank == 0))
    say(f"tokens per iteration will be: {tokens_per_iter:,}", flush=True)
    startup.lap("data")
    trained = load_model(cfg, plan, ray_session, say, startup, precision, dataset_dir, communicator)
    state, wrapped = trained.state, trained.wrapped

    nanogpt_order = cfg.data_order == "nanogpt"
    if nanogpt_order and world_size > 1:  # the launcher refuses this; Tune or a custom trainer might not
        raise ValueError(f"data_order=nanogpt needs one worker, not {world_size}")
    batch_source = NanoGPTOrderBatches if nanogpt_order else Batches
    block_size = state.model_args["block_size"]
    batches = batch_source(dataset_dir, block_size, cfg.batch_size, cfg.seed, rank, world_size, device, accum_steps,
                           vocab_size=state.model_args["vocab_size"])  # fmt: skip
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, device, str(Path(cfg.out_dir)), announce=say.enabled)
    train_step = TrainStep(wrapped, trained.optimizer, precision, batches, accum_steps, cfg.grad_clip, guard)
    estimate_loss = Evaluator(wrapped, batches, precision, cfg.eval_iters, state.model_args, rank, world_size,
                              eager=cfg.compile and not cfg.compile_eval,
                              before_compile=compile_workers.ready_for_compile)  # fmt: skip
    reporter, calls, checkpointer, watch = report_and_stop(cfg, plan, ray_session, say, state, wrapped.module, device,
                                                           tokens_per_iter, accum_steps)  # fmt: skip
    evals = checkpoint_evals(cfg, plan.run_name, ray_session.validation_tasks, say.line, reporter, calls,
                             wrapped.module, dataset_dir)  # fmt: skip
    compiles = Compiles(trained.compile_cache, compile_workers, say)
    after_step = StepHooks()
    after_step.add(compiles.after_step, steps=(1, 3))  # the cache's save, then the workers' stop
    after_step.add(startup.after_step, steps=(1, 2))  # the start-up line, after the cache's summary
    resumed = trained.resumed_batch
    first_batch = batches.train_batch(state.iter_num, 0) if resumed is None else tuple(t.to(device) for t in resumed)
    startup.ready(device)
    return Run(cfg, ray_session, say, state, trained.optimizer, wrapped, guard, train_step, estimate_loss,
               reporter, calls, checkpointer, evals, watch, compiles, after_step, first_batch, trained.source,
               tokens_per_iter)  # fmt: skip


def load_model(cfg: TrainConfig, plan: RunPlan, ray_session: RaySession, say: Say, startup: Startup,
               precision: Precision, dataset_dir: Path, communicator: CommunicatorWarmup) -> Trained:  # fmt: skip
    """The model restored from a checkpoint (a restart, a rerun, init_from=resume), GPT-2's or a fresh one,
    wrapped for the run, with its optimizer and TrainState."""
    rank, world_size, device = ray_session.world_rank, ray_session.world_size, precision.device
    saved, source = find_resume(cfg, plan.resume_from, ray_session.checkpoint, say)
    startup.lap("checkpoint read")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    meta = read_meta(dataset_dir)
    dataset = dataset_identity(meta, dataset_dir)
    # The launcher compared them; a restarted worker may find a dataset prepared again since.
    change = vocabulary_change(checkpoint.dataset_record(saved), dataset) if saved is not None else None
    if change:
        raise DataError(f"{source}: {change}; the dataset was prepared again while the run went on")
    model, model_args = build_model(cfg, meta, saved, precision)
    model.to(device)
    startup.lap("model")
    # Graphs compiled by an earlier process of this run, a rerun or another trial, shared through storage.
    writer = cache_writer(rank, ray_session.local_rank, device)
    compile_cache = open_compile_cache(cfg, device, model_args, world_size, writer=writer, warn=say)
    startup.lap("compile cache")
    communicator.wait()  # before the wrap's first collective
    startup.lap("communicator")
    if cfg.compile:
        say("\n".join(compile_notices(cfg.compile_mode, device.type)), flush=True)
    wrapped = wrap_model(model, cfg, world_size, device, precision.dtype)  # before the optimizer: FSDP shards
    startup.lap("wrap")
    betas = (cfg.beta1, cfg.beta2)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, betas, device.type, say.enabled)
    nanogpt_order = cfg.data_order == "nanogpt"
    state = TrainState(model, optimizer, precision.scaler, model_args, cfg.to_dict(), nanogpt_order, wrapped.sharded)
    state.dataset = dataset  # the data this run trains on, which its checkpoints record
    resumed_batch = state.load_state_dict(saved, source) if saved is not None else None
    del saved  # free the checkpoint's copy of the weights
    startup.lap("optimizer and state")
    if source is not None:
        say(
            f"resuming from {source} at iter {state.iter_num} (best val loss {state.best_val_loss:.4f}) "
            f"with {world_size} worker{'s' if world_size > 1 else ''}",
            flush=True,
        )
    return Trained(state, wrapped, optimizer, compile_cache, resumed_batch, source)


def report_and_stop(cfg: TrainConfig, plan: RunPlan, ray_session: RaySession, say: Say, state: TrainState,
                    model: GPT, device: torch.device, tokens_per_iter: int, accum_steps: int) -> tuple:  # fmt: skip
    """What the loop tells the world (Reporter), writes checkpoints with (Checkpointer), and watches for a
    notice to stop with (PreemptionWatch); the Ray Train calls of all three go through one OrderedRayCalls."""
    rank, world_size = ray_session.world_rank, ray_session.world_size
    wandb_run = None
    if cfg.wandb_log and say.enabled:
        wandb_run, state.wandb_run_id = start_wandb(cfg, Path(cfg.out_dir), state.wandb_run_id)
    mfu = functools.partial(model.estimate_mfu, cfg.batch_size * accum_steps, device=device)
    report = ray_session.report
    if runs_as_ray_tasks(cfg, ray_session.validation_tasks):
        report = reporting_checkpoints_for_validation(report, cfg)
    reporter = Reporter(cfg, say, tokens_per_iter, mfu, device, wandb_run, report_to_ray=report,
                        results_at=join_uri(storage_root(cfg.storage_path), plan.run_name),
                        start_iter=state.iter_num)  # fmt: skip
    calls = OrderedRayCalls(background=cfg.async_checkpoint)
    checkpointer = Checkpointer(cfg.out_dir, rank, calls, sharded=state.sharded,
                                checkpoint_type=ray_session.checkpoint_type, say=say)  # fmt: skip
    # Ray's preemption notice, polled at log cadence (a barrier: every rank polls the same iterations),
    # in order with the reports (Ray numbers both kinds of collective).
    # SIGTERM to the launcher reaches the workers the same way, read from Ray's key-value store.
    stop_asked = None if cfg.local_mode else functools.partial(launcher_asked_to_stop, plan.launch_id)
    tell_launcher = functools.partial(tell_launcher_not_saved, plan.launch_id) if stop_asked and rank == 0 else None
    watch = PreemptionWatch(ray_session.preemption_info, cfg.log_interval, calls.in_order, say.line,
                            agree=functools.partial(largest_over_ranks, world_size=world_size, device=device),
                            stop_asked=stop_asked, tell_launcher=tell_launcher)  # fmt: skip
    return reporter, calls, checkpointer, watch


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    return lr


def evaluate_and_maybe_checkpoint(run: Run, lr: float, next_batch, local_iter_num: int, start_iter: int) -> None:
    """The eval at the cadence, then a checkpoint where the val loss improved (or always_save_checkpoint),
    reported to Ray once written; an eval without a checkpoint is reported in the same order."""
    cfg, state = run.cfg, run.state
    # Never checkpoint weights that a run of non-finite steps left behind.
    nonfinite_streak = run.guard.check(state.iter_num - 1) if local_iter_num > 0 else 0
    # A resumed run starts at its checkpoint's iteration, whose eval was already reported.
    if state.iter_num == start_iter and run.source is not None and not cfg.eval_only:
        return
    losses = run.estimate_loss()
    run.compiles.after_eval(local_iter_num)
    in_sync = weights_in_sync(run.wrapped, run.session.world_size)
    keep = nonfinite_streak == 0 and all(math.isfinite(v) for v in losses.values())
    wanted = state.record_eval(losses) or cfg.always_save_checkpoint
    wanted = wanted and state.iter_num > 0 and not cfg.eval_only
    metrics = run.reporter.eval(state, lr, run.estimate_loss.seconds, in_sync)
    run.evals.at_eval()
    if wanted and keep:  # evals in the loop join the checkpoint's metrics; reported once written
        report = functools.partial(run.reporter.to_ray, run.evals.at_checkpoint(metrics))
        run.checkpointer.save(state, next_batch, report)
        return
    report = functools.partial(run.reporter.to_ray, metrics)
    if wanted:
        run.say.line(f"warning: iter {state.iter_num}: no checkpoint: non-finite losses or gradients "
                     f"(the last good checkpoint stays in {Path(cfg.out_dir)})")  # fmt: skip
    run.calls.report(report)


def checkpoint_on_notice(run: Run, notice: Notice, lr: float, next_batch) -> None:
    """A node is being reclaimed, or SIGTERM: checkpoint now, without an eval, and stop. As at an eval,
    weights that a run of non-finite steps left behind are not saved: the last good checkpoint stays."""
    nonfinite_steps = run.guard.streak()
    metrics = notice_metrics(run.state, lr, run.tokens_per_iter, notice, nonfinite_steps)
    report = functools.partial(run.reporter.to_ray, metrics)
    if nonfinite_steps:
        run.calls.report(report)
    else:
        run.checkpointer.save(run.state, next_batch, report)
    run.calls.wait()
    # SIGTERM: raises Terminated; a preemption: waits for Ray's restart; the launcher's SIGTERM: returns
    run.watch.stop(run.state.iter_num, nonfinite_steps=nonfinite_steps)


def fit(run: Run) -> bool:
    """nanoGPT's loop. Returns True where Tune stopped the trial (a scheduler such as ASHA): it then ends
    at once, reporting nothing more. The last checkpoint may still be being written: end(run) waits."""
    cfg, state = run.cfg, run.state
    X, Y = run.first_batch
    start_iter, local_iter_num, t0 = state.iter_num, 0, time.time()
    while True:
        if run.session.stop_requested():
            return True
        lr = set_lr(run.optimizer, get_lr(state.iter_num, cfg))
        if state.iter_num % cfg.eval_interval == 0 or state.iter_num >= cfg.max_iters:
            evaluate_and_maybe_checkpoint(run, lr, (X, Y), local_iter_num, start_iter)
        if cfg.eval_only or state.iter_num >= cfg.max_iters:
            return False
        notice = run.watch.notice(state.iter_num)
        if notice is not None:
            checkpoint_on_notice(run, notice, lr, (X, Y))
            return False

        loss_sum, grad_norm, X, Y = run.train_step(X, Y, state.iter_num)

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        state.iter_num += 1
        local_iter_num += 1
        run.after_step(local_iter_num, t1, last=state.iter_num >= cfg.max_iters)
        if state.iter_num % cfg.log_interval == 0:
            log_step(run, loss_sum, grad_norm, lr, dt)


def log_step(run: Run, loss_sum: torch.Tensor, grad_norm: torch.Tensor, lr: float, dt: float) -> None:
    """Every log_interval: the step's loss and gradient norm and the non-finite guard's counts, read to the
    host in one transfer (the log step's one sync), then the guard's check and the reporter's line."""
    iter_num = run.state.iter_num - 1
    loss, norm, *counts = torch.stack([loss_sum, grad_norm.float(), *run.guard.counts()]).tolist()
    run.guard.check(iter_num, counts)
    run.reporter.step(iter_num, loss, norm, lr, dt, run.state.last_eval["val"], run.guard.skipped)


def start(loop_config: dict, ray_session: RaySession) -> Run:
    """The worker's Run, from the launcher's loop_config; the start-up line counts from here."""
    started = time.time()
    cfg, plan = TrainConfig.from_dict(loop_config["config"]), RunPlan(**loop_config["plan"])
    return setup(cfg, plan, ray_session, started)


def end(run: Run) -> None:
    if run.state.iter_num >= run.cfg.max_iters:  # not stopped on a notice, which must not wait
        run.evals.finish()  # the last checkpoints' outstanding evals, shown as they end
    run.calls.close()  # the last checkpoint is written and reported before the run ends
    run.reporter.finish()


def train_loop_per_worker(loop_config: dict) -> None:
    """A Ray Train worker's training function (raygpt.driver.trainer.build_trainer)."""
    run = start(loop_config, train_worker())
    fit(run)
    end(run)


TRIAL_EXIT_WAIT_S = 10.0  # at most, for a stopped trial's loop to end before its process does


def train_in_tune_trial(loop_config: dict) -> None:
    """A one-worker Tune trial's training, in the trial's own process (raygpt.tune), and Tune's stop protocol.

    Tune ends a process it will not reuse (the sweep's last trial, a stopped one) right after it sets
    the trial's stop event, while the loop, in Tune's daemon thread, may be inside a torch call. Python's
    exit then stops that thread as it takes the GIL back, which aborts the process with a fatal error
    and a stack on the user's console. The exit waits for the loop, which ends at its next iteration."""
    with exit_waits_for_block(TRIAL_EXIT_WAIT_S):
        run = start(loop_config, tune_trial())
        stopped = fit(run)
        try:
            run.calls.close()  # the last checkpoint is written and reported before the trial ends
        except SystemExit as stop:  # Tune ends a stopped trial in its report (code 0); the checkpoint is written
            if stop.code not in (0, None):
                raise
            stopped = True
        run.reporter.finish()
        if stopped:  # as Tune ends a stopped trial; a return would hand it one more result, which it never reads
            raise SystemExit(0)
