"""What a checkpoint holds, how it is written (atomically) and read (safely), and Ray Checkpoint <-> files.

A checkpoint is one `ckpt.pt` with nanoGPT's layout (model, optimizer, model_args, iter_num,
best_val_loss, config) plus raygpt's additions (scaler, seed, wandb_run_id). It holds only tensors
and plain Python values, so `torch.load(weights_only=True)` reads it and no user file is unpickled.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

from raygpt.errors import RaygptError

CKPT_NAME = "ckpt.pt"
REQUIRED_KEYS = ("model", "model_args", "iter_num")


class CheckpointError(RaygptError, RuntimeError):
    """A checkpoint that is missing, damaged, or not a checkpoint; the message is one line."""


def save_atomic(state: dict, path: str | Path) -> None:
    """Write `state` to `path` so that a crash at any moment leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path) -> dict:
    """Read a checkpoint with weights_only=True; every failure is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
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
    return state


def to_ray(state: dict, directory: str | Path):
    """Write `state` as ckpt.pt into `directory` and wrap it as a ray.train.Checkpoint."""
    from ray.train import Checkpoint

    save_atomic(state, Path(directory) / CKPT_NAME)
    return Checkpoint.from_directory(str(directory))


def from_ray(checkpoint) -> dict:
    """Load the ckpt.pt inside a ray.train.Checkpoint."""
    with checkpoint.as_directory() as directory:
        return load(Path(directory) / CKPT_NAME)


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
