"""train_loop_per_worker: nanoGPT's training loop, run by every Ray Train worker.

The only module that calls ray.train inside the workers. Read top to bottom it is nanoGPT's train.py:
set up the device and precision, build or restore the model, then loop over eval -> checkpoint ->
accumulate gradients -> clip -> step -> log, with Ray taking the place of torchrun.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from raygpt import checkpoint
from raygpt.config import TrainConfig
from raygpt.data import Batches, NanoGPTOrderBatches
from raygpt.model import GPT, GPTConfig, clean_state_dict
from raygpt.speed import (
    compile_model,
    eval_group_size,
    set_attention_backend,
    skip_nonfinite_on_device,
    start_compile_workers,
    stop_compile_workers,
    uses_cuda_graphs,
)
from raygpt.tokenizer import load_meta

MODEL_ARG_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")
DEFAULT_VOCAB_SIZE = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
# Reported metric -> WandB key (nanoGPT's names where it has them).
WANDB_KEYS = {
    "loss": "train/loss",
    "val_loss": "val/loss",
    "train_loss": "eval/train_loss",
    "lr": "lr",
    "mfu": "mfu",
    "tokens_per_sec": "tokens/s",
    "tokens_seen": "tokens_seen",
    "peak_memory_gib": "peak_memory_gib",
}


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


def resolve_dtype(name: str, device: torch.device) -> str:
    """'auto' -> bfloat16 where the GPU supports it, else float16 on CUDA, float32 on CPU."""
    if device.type != "cuda":
        if name == "auto":
            return "float32"
        return name
    bf16_ok = torch.cuda.is_bf16_supported()
    if name == "auto":
        return "bfloat16" if bf16_ok else "float16"
    if name == "bfloat16" and not bf16_ok:
        raise RuntimeError(
            f"dtype bfloat16 is not supported by {torch.cuda.get_device_name(device)}; use --dtype=float16"
        )
    return name


def build_model(cfg: TrainConfig, meta: dict | None, state: dict | None, explicit_keys: set[str]):
    """The GPT to train, from a checkpoint's weights, GPT-2's, or scratch; and its model_args."""
    if state is not None:
        model_args = dict(state["model_args"])
        conflicts = [
            f"{key}={getattr(cfg, key)} (checkpoint has {model_args[key]})"
            for key in MODEL_ARG_KEYS
            if key in explicit_keys
            and key in model_args
            and key != "block_size"
            and getattr(cfg, key) != model_args[key]
        ]
        if conflicts:
            raise ValueError("the checkpoint's architecture conflicts with the config: " + ", ".join(conflicts))
        model_args["dropout"] = cfg.dropout
        model = GPT(GPTConfig(**model_args))
        model.load_state_dict(clean_state_dict(state["model"]))
    elif cfg.init_from == "scratch":
        vocab_size = meta["vocab_size"] if meta else DEFAULT_VOCAB_SIZE
        model_args = dict(
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.n_embd,
            block_size=cfg.block_size,
            bias=cfg.bias,
            vocab_size=vocab_size,
            dropout=cfg.dropout,
        )
        model = GPT(GPTConfig(**model_args))
    else:
        model = GPT.from_pretrained(cfg.init_from, dict(dropout=cfg.dropout))
        model_args = {key: getattr(model.config, key) for key in MODEL_ARG_KEYS}
        model_args["dropout"] = cfg.dropout
    if cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)
        model_args["block_size"] = cfg.block_size
    return model, model_args


def forward_backward(
    model,
    raw_model,
    optimizer,
    scaler,
    autocast,
    batches: Batches,
    X,
    Y,
    iter_num: int,
    accum_steps: int,
    grad_clip: float,
    ddp: bool,
    cuda_graphs: bool = False,
):
    """Gradients of one iteration over accum_steps micro-batches, unscaled and clipped.

    Returns the summed (already 1/accum_steps-scaled) loss, the gradient norm, and the first batch of
    the next iteration, which was fetched while the device worked on this one."""
    loss_sum = torch.zeros((), device=X.device)
    for micro_step in range(accum_steps):
        if ddp:
            # DDP all-reduces gradients only on the last micro-step; earlier ones just accumulate.
            model.require_backward_grad_sync = micro_step == accum_steps - 1
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # each micro-step replays the graphs afresh
        with autocast:
            _, loss = model(X, Y)
            loss = loss / accum_steps
        loss_sum += loss.detach()
        # Fetch the next batch while the GPU is still busy with this one.
        X, Y = (
            batches.train_batch(iter_num, micro_step + 1)
            if micro_step + 1 < accum_steps
            else batches.train_batch(iter_num + 1, 0)
        )
        scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    params = [p for p in raw_model.parameters() if p.grad is not None]
    if grad_clip > 0.0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    return loss_sum, grad_norm, X, Y


def worker_cpu_count(cfg: TrainConfig) -> int:
    """The CPUs this worker may use; Ray sets OMP_NUM_THREADS=1, which would leave torch on one thread."""
    if cfg.cpus_per_worker:  # what the launcher reserved (in local mode: this machine's CPUs)
        return max(1, int(cfg.cpus_per_worker))
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def save_checkpoint(state: dict, out_dir: Path):
    """Write ckpt.pt to out_dir (for nanoGPT-style tools) and return it as a Ray Checkpoint."""
    ckpt_path = out_dir / checkpoint.CKPT_NAME
    checkpoint.save_atomic(state, ckpt_path)
    # Ray uploads the folder; a hard link hands it the file without a second serialization.
    upload_dir = Path(tempfile.mkdtemp(prefix=".ray-upload-", dir=out_dir))
    try:
        os.link(ckpt_path, upload_dir / checkpoint.CKPT_NAME)
    except OSError:
        shutil.copy2(ckpt_path, upload_dir / checkpoint.CKPT_NAME)
    from ray.train import Checkpoint

    return Checkpoint.from_directory(str(upload_dir)), upload_dir


def format_eta(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train

    cfg = TrainConfig.from_dict(loop_config["config"])
    explicit_keys = set(loop_config.get("explicit_keys", ()))

    # ---- where am I: rank, device, precision -------------------------------------------------
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    master_process = rank == 0
    if cfg.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    device_type = device.type
    torch.set_num_threads(worker_cpu_count(cfg))
    torch.backends.cuda.matmul.allow_tf32 = True  # tf32 matmuls on Ampere and newer
    torch.backends.cudnn.allow_tf32 = True
    if device_type == "cuda":
        set_attention_backend(cfg.attention)
        if cfg.compile:
            start_compile_workers()  # they boot while the model, optimizer and data are set up
    dtype = resolve_dtype(cfg.dtype, device)
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    autocast = nullcontext() if dtype == "float32" else torch.amp.autocast(device_type=device_type, dtype=ptdtype)

    # gradient_accumulation_steps is the global count, as with nanoGPT under torchrun.
    accum_steps = max(1, cfg.gradient_accumulation_steps // world_size)  # divisibility: checked by the launcher
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    out_dir = Path(cfg.out_dir)
    if master_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"tokens per iteration will be: {tokens_per_iter:,}", flush=True)

    dataset_dir = Path(cfg.data_dir) / cfg.dataset
    meta = load_meta(dataset_dir)

    # ---- model: a Ray checkpoint (restart or rerun) wins, then init_from -------------------------
    state, resumed_from, resumed_batch = None, None, None
    ray_checkpoint = ray.train.get_checkpoint()
    if ray_checkpoint is not None or cfg.init_from == "resume":
        state, resumed_from = checkpoint.load_resume_state(
            ray_checkpoint, out_dir / checkpoint.CKPT_NAME, warn=lambda text: master_process and print(text, flush=True)
        )
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model, model_args = build_model(cfg, meta, state, explicit_keys)
    model.to(device)
    block_size = model_args["block_size"]

    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    optimizer = model.configure_optimizers(
        cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type, verbose=master_process
    )
    iter_num, best_val_loss, wandb_run_id = 0, float("inf"), None
    last_eval = {"train": float("nan"), "val": float("nan")}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        iter_num = state["iter_num"]
        best_val_loss = state.get("best_val_loss", float("inf"))
        wandb_run_id = state.get("wandb_run_id")
        last_eval = state.get("last_eval", last_eval)
        if cfg.data_order == "nanogpt" and state.get("torch_rng_state") is not None:
            torch.set_rng_state(state["torch_rng_state"])
            resumed_batch = state.get("next_batch")
        if master_process:
            print(f"resuming from {resumed_from} at iter {iter_num} (best val loss {best_val_loss:.4f})", flush=True)
    start_iter = iter_num
    state = None  # free the checkpoint's copy of the weights

    raw_model = model
    if cfg.compile:
        if master_process:
            print("compiling the model... (takes a ~minute)", flush=True)
        model = compile_model(model, cfg.compile_mode if device_type == "cuda" else "default", cfg.compile_regions)
    cuda_graphs = cfg.compile and uses_cuda_graphs(cfg.compile_mode, device_type)
    # The eval forward (no grad, no dropout) is a graph of its own: compiling it costs a second compile.
    eval_model = model
    eval_graphs = cuda_graphs and cfg.compile_eval

    def eval_stance():
        return torch.compiler.set_stance("force_eager") if cfg.compile and not cfg.compile_eval else nullcontext()

    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device_type == "cuda" else None)

    nanogpt_order = cfg.data_order == "nanogpt"
    if nanogpt_order and world_size > 1:  # the launcher refuses this; Tune or a custom trainer might not
        raise ValueError(f"data_order=nanogpt needs one worker, not {world_size}")
    batches = (NanoGPTOrderBatches if nanogpt_order else Batches)(
        dataset_dir, block_size, cfg.batch_size, cfg.seed, rank, world_size, device
    )

    wandb_run = None
    if cfg.wandb_log and master_process:
        import wandb

        wandb_run_id = wandb_run_id or secrets.token_hex(4)
        wandb_run = wandb.init(
            project=cfg.wandb_project,
            name=cfg.wandb_run_name,
            id=wandb_run_id,
            resume="allow",
            config=cfg.to_dict(),
            dir=str(out_dir),
        )

    compile_workers_stopping = None  # the thread stopping Inductor's compile workers, once started

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        """Mean loss over the fixed eval windows; each rank takes every world_size-th window and the
        per-window losses are summed into one vector, so the result does not depend on world_size."""
        if compile_workers_stopping is not None:
            compile_workers_stopping.join()  # an eval graph compiled now needs a pool of its own
        eval_model.eval()
        out = {}
        my_batches = list(range(rank, cfg.eval_iters, world_size))
        group = eval_group_size(
            len(my_batches), cfg.batch_size, block_size, model_args["vocab_size"], model_args["n_embd"]
        )
        for split in ("train", "val"):
            loss_sum = torch.zeros((), device=device)
            for i in range(0, len(my_batches), group):
                ks = my_batches[i : i + group]
                X, Y = batches.eval_batch(split, ks)
                if eval_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                with autocast, eval_stance():
                    _, loss = eval_model(X, Y)
                # Equal-sized batches: their summed mean losses are the group's mean times its size.
                loss_sum += loss.float() * len(ks)
            if world_size > 1:
                dist.all_reduce(loss_sum)
            out[split] = loss_sum.item() / cfg.eval_iters
        eval_model.train()
        return out

    def make_state() -> dict:
        return {
            "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "model_args": model_args,
            "iter_num": iter_num,
            "best_val_loss": best_val_loss,
            "config": cfg.to_dict(),
            "seed": cfg.seed,
            "wandb_run_id": wandb_run_id,
            "last_eval": last_eval,
            "resumed_from": str(resumed_from) if resumed_from else None,  # lineage, for debugging
            # data_order=nanogpt: where the running random stream is and the batch already drawn from it
            # for the next step; a resume restores both and continues exactly as the run would have.
            "torch_rng_state": torch.get_rng_state() if nanogpt_order else None,
            "next_batch": (X.cpu(), Y.cpu()) if nanogpt_order else None,
        }

    def weights_in_sync() -> bool:
        """DDP keeps every rank's weights identical; compare a cheap fingerprint to prove it."""
        with torch.no_grad():
            fingerprint = torch.stack([p.detach().double().sum() for p in raw_model.parameters()]).sum()
        if world_size == 1:
            return True
        fingerprints = [torch.zeros_like(fingerprint) for _ in range(world_size)]
        dist.all_gather(fingerprints, fingerprint)
        return all(torch.equal(f, fingerprints[0]) for f in fingerprints)

    def log_to_wandb(metrics: dict) -> None:
        wandb_run.log(
            {WANDB_KEYS[k]: v for k, v in metrics.items() if k in WANDB_KEYS and v is not None}, step=metrics["iter"]
        )

    def report(metrics: dict, ray_checkpoint=None) -> None:
        ray.train.report(metrics, checkpoint=ray_checkpoint)
        if wandb_run is not None:
            log_to_wandb(metrics)

    # ---- the loop ---------------------------------------------------------------------------
    X, Y = batches.train_batch(iter_num, 0) if resumed_batch is None else tuple(t.to(device) for t in resumed_batch)
    t0 = time.time()
    local_iter_num = 0
    running_mfu = -1.0
    step_times: list[float] = []
    nonfinite_in_a_row = 0
    # On the GPU path the skip decision stays on the device; these are read at log and eval steps.
    nonfinite_run = torch.zeros((), device=device)
    nonfinite_since_check = torch.zeros((), device=device)

    def check_nonfinite(it: int) -> None:
        run, since = (int(v) for v in torch.stack([nonfinite_run, nonfinite_since_check]).tolist())
        if since and master_process:
            print(
                f"warning: iter {it}: {since} step(s) skipped for a non-finite loss or gradient norm ({run} in a row)",
                flush=True,
            )
        nonfinite_since_check.zero_()
        if cfg.max_nonfinite_steps and run >= cfg.max_nonfinite_steps:
            raise FloatingPointError(
                f"{run} consecutive steps with a non-finite loss or gradient at iter {it};"
                f" stopping (the last good checkpoint is in {out_dir}); lower learning_rate or use bfloat16"
            )

    while True:
        lr = get_lr(iter_num, cfg)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr

        is_eval_iter = iter_num % cfg.eval_interval == 0 or iter_num >= cfg.max_iters
        # A resumed run starts at its checkpoint's iteration, whose eval was already reported.
        if is_eval_iter and local_iter_num > 0:
            check_nonfinite(iter_num - 1)  # never checkpoint weights a run of bad steps left behind
        if is_eval_iter and (iter_num != start_iter or resumed_from is None or cfg.eval_only):
            eval_start = time.time()
            last_eval = estimate_loss()
            eval_seconds = time.time() - eval_start
            improved = last_eval["val"] < best_val_loss
            best_val_loss = min(best_val_loss, last_eval["val"])
            # The allocator's high-water mark so far: what decides whether a micro-batch fits.
            peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device_type == "cuda" else None
            if master_process:
                memory_text = f", peak memory {peak_memory_gib:.2f} GiB" if peak_memory_gib is not None else ""
                print(
                    f"step {iter_num}: train loss {last_eval['train']:.4f}, val loss {last_eval['val']:.4f} "
                    f"(eval {eval_seconds:.2f}s{memory_text})",
                    flush=True,
                )
            metrics = {
                "iter": iter_num,
                "train_loss": last_eval["train"],
                "val_loss": last_eval["val"],
                "best_val_loss": best_val_loss,
                "lr": lr,
                "tokens_seen": iter_num * tokens_per_iter,
                "peak_memory_gib": peak_memory_gib,
                "weights_in_sync": weights_in_sync(),
            }
            upload_dir = None
            ray_ckpt = None
            if master_process and iter_num > 0 and not cfg.eval_only and (improved or cfg.always_save_checkpoint):
                print(f"saving checkpoint to {out_dir}", flush=True)
                ray_ckpt, upload_dir = save_checkpoint(make_state(), out_dir)
            if master_process and cfg.eval_only:
                # Ray's Result carries only checkpointed metrics: leave the numbers where people look.
                (out_dir / "eval.json.tmp").write_text(json.dumps({**metrics, "eval_iters": cfg.eval_iters}))
                os.replace(out_dir / "eval.json.tmp", out_dir / "eval.json")
            report(metrics, ray_ckpt)
            if upload_dir is not None:
                shutil.rmtree(upload_dir, ignore_errors=True)
        if cfg.eval_only or iter_num >= cfg.max_iters:
            break

        if not nanogpt_order:  # (nanoGPT's order keeps one running stream for batches and dropout)
            torch.manual_seed(hash((cfg.seed, iter_num, rank)) & 0x7FFF_FFFF)  # dropout is a function of the step
        loss_sum, grad_norm, X, Y = forward_backward(
            model,
            raw_model,
            optimizer,
            scaler,
            autocast,
            batches,
            X,
            Y,
            iter_num,
            accum_steps,
            cfg.grad_clip,
            ddp=world_size > 1,
            cuda_graphs=cuda_graphs,
        )
        # The gradient norm is all-reduced, so every rank takes the same decision here.
        skipped = None if scaler.is_enabled() else skip_nonfinite_on_device(optimizer, grad_norm)
        if skipped is not None:
            nonfinite_run.copy_(torch.where(skipped > 0, nonfinite_run + 1, 0.0))
            nonfinite_since_check.add_(skipped)
        elif torch.isfinite(grad_norm):
            scaler.step(optimizer)
            nonfinite_in_a_row = 0
        elif scaler.is_enabled() and scaler.get_scale() >= 1.0:
            pass  # float16 overflow: the scaler skips the step and lowers its scale, as designed
        else:
            nonfinite_in_a_row += 1
            if master_process:
                print(
                    f"warning: iter {iter_num}: non-finite gradient norm, step skipped ({nonfinite_in_a_row} in a row)",
                    flush=True,
                )
            if cfg.max_nonfinite_steps and nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{nonfinite_in_a_row} consecutive steps with a non-finite loss or gradient at iter {iter_num};"
                    f" stopping (the last good checkpoint is in {out_dir}); lower learning_rate or use bfloat16"
                )
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        iter_num += 1
        local_iter_num += 1
        if cfg.compile and device_type == "cuda" and local_iter_num == 3:
            # Forward and backward are compiled (and CUDA graphs recorded) by now.
            compile_workers_stopping = stop_compile_workers()
        if iter_num % cfg.log_interval == 0:
            check_nonfinite(iter_num - 1)
            lossf = loss_sum.item()
            if local_iter_num >= 5:  # let the first iterations (compile, warm-up) pass
                step_times.append(dt)
                mfu = raw_model.estimate_mfu(cfg.batch_size * accum_steps, dt, device)
                if mfu is not None:
                    running_mfu = mfu if running_mfu < 0 else 0.9 * running_mfu + 0.1 * mfu
            tokens_per_sec = tokens_per_iter / dt
            if master_process:
                typical_dt = sorted(step_times)[len(step_times) // 2] if step_times else dt
                mfu_text = f"{running_mfu * 100:.2f}%" if running_mfu >= 0 else "n/a"
                print(
                    f"iter {iter_num - 1}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, mfu {mfu_text}, "
                    f"{tokens_per_sec:,.0f} tok/s, lr {lr:.2e}, "
                    f"eta {format_eta((cfg.max_iters - iter_num) * typical_dt)}",
                    flush=True,
                )
            # Only evals go to ray.train.report: a report made within Ray's 2 s controller poll of the
            # previous one blocks until it is consumed (measured: ~2 s a call), far over 1% of a step.
            if wandb_run is not None:
                log_to_wandb(
                    {
                        "iter": iter_num - 1,
                        "loss": lossf,
                        "val_loss": last_eval["val"],
                        "lr": lr,
                        "mfu": running_mfu if running_mfu >= 0 else None,
                        "tokens_per_sec": tokens_per_sec,
                        "tokens_seen": iter_num * tokens_per_iter,
                    }
                )
    if wandb_run is not None:
        wandb_run.finish()
