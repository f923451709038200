"""What a checkpoint holds, how it is written (atomically) and read (safely), and Ray Checkpoint <-> files.

A checkpoint is one `ckpt.pt` with nanoGPT's layout (model, optimizer, model_args, iter_num,
best_val_loss, config) plus raygpt's additions (scaler, seed, wandb_run_id). It holds only tensors
and plain Python values, so `torch.load(weights_only=True)` reads it and no user file is unpickled.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import torch

from raygpt.errors import RaygptError
from raygpt.files import remove_orphaned_temporaries, write_atomic
from raygpt.model import clean_state_dict

CKPT_NAME = "ckpt.pt"
REQUIRED_KEYS = ("model", "model_args", "iter_num")
ARCHITECTURE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")
UPLOAD_PREFIX = ".ray-upload-"


class CheckpointError(RaygptError, RuntimeError):
    """A checkpoint that is missing, damaged, or not a checkpoint; the message is one line."""


def save_atomic(state: dict, path: str | Path) -> None:
    """torch.save `state` to `path` through files.write_atomic: the old file or the new one, never half of one."""
    write_atomic(path, lambda f: torch.save(state, f))


def load(path: str | Path, mmap: bool = False) -> dict:
    """Read a checkpoint with weights_only=True; every failure is a one-line CheckpointError.

    Numbers are normalized to plain Python values (nanoGPT saves best_val_loss as a 0-dim tensor)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        # mmap: tensors are read from the file when touched, so reading a checkpoint's small values
        # (model_args, iter_num) does not read its gigabytes of weights.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # weights_only refuses anything that would import or call code; say what it was.
        refused = re.search(r"GLOBAL (\S+)", str(e), re.IGNORECASE)
        if refused:
            raise CheckpointError(
                f"{path} was refused: it holds Python objects ({refused.group(1)}), not only "
                "tensors and plain values; raygpt never unpickles code"
            ) from None
        raise CheckpointError(f"{path} is damaged or truncated and cannot be read (not a torch checkpoint)") from None
    except Exception as e:  # a damaged file fails anywhere in the unpickler, with any exception type
        raise CheckpointError(f"{path} is damaged or truncated and cannot be read ({type(e).__name__})") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a GPT checkpoint (needs keys {', '.join(REQUIRED_KEYS)})")
    return normalized(state, path)


def plain_number(value, what: str, path) -> float | int:
    """A number read from a checkpoint as a Python int or float (0-dim tensors and numpy scalars included)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    elif hasattr(value, "item") and not isinstance(value, (bool, int, float)):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{path}: {what} must be a number, got {type(value).__name__}")
    return value


def normalized(state: dict, path) -> dict:
    """Check and normalize the values a resume reads, so that none reaches Ray or the loop malformed."""
    iter_num = plain_number(state["iter_num"], "iter_num", path)
    if not float(iter_num).is_integer() or iter_num < 0:
        raise CheckpointError(f"{path}: iter_num must be a non-negative integer, got {iter_num!r}")
    state["iter_num"] = int(iter_num)
    if not isinstance(state["model_args"], dict):
        raise CheckpointError(f"{path}: model_args must be a dict, got {type(state['model_args']).__name__}")
    if state.get("best_val_loss") is not None:
        state["best_val_loss"] = float(plain_number(state["best_val_loss"], "best_val_loss", path))
    last_eval = state.get("last_eval")
    if isinstance(last_eval, dict):
        state["last_eval"] = {k: float(plain_number(v, f"last_eval[{k!r}]", path)) for k, v in last_eval.items()}
    elif last_eval is not None:
        raise CheckpointError(f"{path}: last_eval must be a dict, got {type(last_eval).__name__}")
    return state


def architecture(state: dict, where) -> dict:
    """model_args of a checkpoint, checked: what GPTConfig needs, each a value it can build from."""
    model_args = state["model_args"]
    args = {}
    for key in ARCHITECTURE_KEYS:
        value = model_args.get(key)
        if hasattr(value, "item") and not isinstance(value, (bool, int, float)):
            value = value.item()
        expected_bool = key == "bias"
        if expected_bool != isinstance(value, bool) or not (expected_bool or (isinstance(value, int) and value > 0)):
            raise CheckpointError(
                f"{where}: model_args[{key!r}] must be {'a bool' if expected_bool else 'a positive int'}, got {value!r}"
            )
        args[key] = value
    if args["n_embd"] % args["n_head"]:
        raise CheckpointError(
            f"{where}: model_args n_embd {args['n_embd']} is not divisible by n_head {args['n_head']}"
        )
    return args


def read_summary(path: str | Path) -> dict:
    """model_args (checked), iter_num and config of a ckpt.pt, without reading its weights."""
    state = load(path, mmap=True)
    return {
        "model_args": architecture(state, path),
        "iter_num": state["iter_num"],
        "config": state.get("config") if isinstance(state.get("config"), dict) else {},
    }


def newest_readable(paths: list[Path], warn=print) -> tuple[Path, dict]:
    """The first of `paths` (newest first) whose summary reads, skipping damaged ones with a warning."""
    problems = []
    for path in paths:
        try:
            return path, read_summary(path)
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint: {e}")
            problems.append(str(e))
    raise CheckpointError("no usable checkpoint to resume from: " + "; ".join(problems))


def from_ray(checkpoint) -> dict:
    """Load the ckpt.pt inside a ray.train.Checkpoint."""
    with checkpoint.as_directory() as directory:
        return load(Path(directory) / CKPT_NAME)


class TrainState:
    """Everything a checkpoint holds: the model's weights, the optimizer and the gradient scaler, and
    where training is (iteration, best and last eval, the WandB run, and for data_order=nanogpt the
    random stream). `state_dict()` captures it, `load_state_dict()` restores it; writing is the
    Checkpointer's. The keys are nanoGPT's (model, optimizer, model_args, iter_num, best_val_loss,
    config), so nanoGPT's sample.py reads a raygpt ckpt.pt and raygpt resumes a nanoGPT one."""

    def __init__(self, model, optimizer, scaler, model_args: dict, config: dict, keeps_random_stream: bool):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.model_args, self.config = model_args, config
        self.keeps_random_stream = keeps_random_stream  # data_order=nanogpt: batches come from torch's RNG
        self.iter_num = 0
        self.best_val_loss = float("inf")
        self.last_eval = {"train": float("nan"), "val": float("nan")}
        self.wandb_run_id: str | None = None
        self.resumed_from: str | None = None

    def record_eval(self, losses: dict[str, float]) -> bool:
        """Keep an eval's losses; returns whether val improved on the best so far (never for NaN)."""
        improved = losses["val"] < self.best_val_loss
        self.last_eval = losses
        self.best_val_loss = min(self.best_val_loss, losses["val"])
        return improved

    def state_dict(self, next_batch) -> dict:
        """What to save; `next_batch` is the batch already drawn for the next step (kept with nanoGPT's
        order, whose random stream has moved past it)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "model_args": self.model_args,
            "iter_num": self.iter_num,
            "best_val_loss": self.best_val_loss,
            "config": self.config,
            "seed": self.config.get("seed"),
            "wandb_run_id": self.wandb_run_id,
            "last_eval": self.last_eval,
            "resumed_from": self.resumed_from,  # lineage, for debugging
            "torch_rng_state": torch.get_rng_state() if self.keeps_random_stream else None,
            "next_batch": tuple(t.cpu() for t in next_batch) if self.keeps_random_stream else None,
        }

    def load_state_dict(self, saved: dict, source: str):
        """Restore from a loaded checkpoint; returns the saved next batch (nanoGPT's order) or None."""
        self.model.load_state_dict(clean_state_dict(saved["model"]))
        self.optimizer.load_state_dict(saved["optimizer"])
        if saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.iter_num = saved["iter_num"]
        best = saved.get("best_val_loss")
        self.best_val_loss = float("inf") if best is None else best
        self.wandb_run_id = saved.get("wandb_run_id")
        self.last_eval = saved.get("last_eval") or self.last_eval
        self.resumed_from = source
        if self.keeps_random_stream and saved.get("torch_rng_state") is not None:
            torch.set_rng_state(saved["torch_rng_state"])
            return saved.get("next_batch")
        return None


class Checkpointer:
    """Writes checkpoints and hands them to Ray: out_dir/ckpt.pt (the newest, for nanoGPT-style tools)
    and, for Ray's upload, a folder holding the same file. Rank 0 writes; the other ranks hand Ray None."""

    def __init__(self, out_dir: str | Path, writes: bool):
        self.out_dir, self.writes = Path(out_dir), writes
        self.upload_dirs: list[Path] = []

    def save(self, state: TrainState, next_batch):
        """Write `state`; returns the ray.train.Checkpoint to report (None on ranks that do not write)."""
        if not self.writes:
            return None
        from ray.train import Checkpoint

        print(f"saving checkpoint to {self.out_dir}", flush=True)
        ckpt_path = self.out_dir / CKPT_NAME
        save_atomic(state.state_dict(next_batch), ckpt_path)
        # Ray uploads the folder; a hard link hands it the file without a second serialization.
        upload_dir = Path(tempfile.mkdtemp(prefix=UPLOAD_PREFIX, dir=self.out_dir))
        try:
            os.link(ckpt_path, upload_dir / CKPT_NAME)
        except OSError:
            shutil.copy2(ckpt_path, upload_dir / CKPT_NAME)
        self.upload_dirs.append(upload_dir)
        return Checkpoint.from_directory(str(upload_dir))

    def reported(self) -> None:
        """Ray has copied the reported checkpoint into its storage: drop the upload folders."""
        for upload_dir in self.upload_dirs:
            shutil.rmtree(upload_dir, ignore_errors=True)
        self.upload_dirs.clear()


def remove_leftovers(out_dir: str | Path) -> list[Path]:
    """What a run killed while saving leaves in out_dir: a half-written ckpt.pt and upload folders."""
    out_dir = Path(out_dir)
    removed = remove_orphaned_temporaries(out_dir, CKPT_NAME)
    for upload_dir in out_dir.glob(f"{UPLOAD_PREFIX}*") if out_dir.is_dir() else ():
        if upload_dir.is_dir():
            shutil.rmtree(upload_dir, ignore_errors=True)
            removed.append(upload_dir)
    return removed


def load_resume_state(ray_checkpoint=None, fallback: str | Path | None = None, warn=print) -> tuple[dict, str]:
    """The newest checkpoint that loads: Ray's latest, then older ones of the same run (local storage),
    then `fallback` (out_dir/ckpt.pt). A damaged one is reported and skipped, never half-loaded."""
    candidates: list = []
    if ray_checkpoint is not None:
        latest = Path(ray_checkpoint.path)
        if getattr(ray_checkpoint.filesystem, "type_name", "") == "local" and latest.parent.is_dir():
            older = sorted(
                (p for p in latest.parent.glob("checkpoint_*") if p.is_dir() and p.name < latest.name), reverse=True
            )
            candidates += [latest / CKPT_NAME, *(p / CKPT_NAME for p in older)]
        else:
            candidates.append(ray_checkpoint)
    if fallback is not None:
        candidates.append(Path(fallback))
    for candidate in candidates:
        try:
            if isinstance(candidate, Path):
                return load(candidate), str(candidate)
            return from_ray(candidate), candidate.path
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint: {e}")
    raise CheckpointError(
        "no usable checkpoint to resume from (" + ", ".join(str(getattr(c, "path", c)) for c in candidates) + ")"
    )
