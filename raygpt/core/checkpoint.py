"""What a checkpoint holds, how it is written (atomically) and read (safely), and Ray Checkpoint <-> files.

A checkpoint is one `ckpt.pt` with nanoGPT's layout (model, optimizer, model_args, iter_num,
best_val_loss, config) plus raygpt's additions (scaler, seed, wandb_run_id). It holds only tensors
and plain Python values, so `torch.load(weights_only=True)` reads it and no user file is unpickled.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from raygpt.core.model import GPT, GPTConfig, clean_state_dict
from raygpt.errors import RaygptError
from raygpt.storage.files import remove_orphaned_temporaries, write_atomic
from raygpt.storage.uri import StorageError, download_folder, is_uri, join_uri, read_small_file

CKPT_NAME = "ckpt.pt"
REQUIRED_KEYS = ("model", "model_args", "iter_num")
ARCHITECTURE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")
UPLOAD_PREFIX = ".ray-upload-"
# A sharded (FSDP) checkpoint is a folder: torch.distributed.checkpoint's files (one per rank, and the
# metadata rank 0 writes last) for model and optimizer, and train_state.pt for everything else.
PROGRESS_NAME = "train_state.pt"
PROGRESS_KEYS = ("model_args", "iter_num")
DCP_METADATA = ".metadata"
# Beside every checkpoint handed to Ray: what the launcher reads to decide on a rerun, so a checkpoint in
# object storage is judged without downloading its weights.
SUMMARY_NAME = "summary.json"
SHARDED_DIR = "sharded_dir"


class CheckpointError(RaygptError, RuntimeError):
    """A checkpoint that is missing, damaged, or not a checkpoint; the message is one line."""


def save_atomic(state: dict, path: str | Path) -> None:
    """torch.save `state` to `path` through files.write_atomic: the old file or the new one, never half of one."""
    write_atomic(path, lambda f: torch.save(state, f))


def load(path: str | Path, mmap: bool = False, required: tuple[str, ...] = REQUIRED_KEYS) -> dict:
    """Read a checkpoint with weights_only=True; every failure is a one-line CheckpointError.

    Numbers are normalized to plain Python values (nanoGPT saves best_val_loss as a 0-dim tensor)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = _torch_load(path, mmap)
    except PermissionError as e:  # not damage: the file may be fine for its owner
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
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
    if not isinstance(state, dict) or any(key not in state for key in required):
        raise CheckpointError(f"{path} is not a GPT checkpoint (needs keys {', '.join(required)})")
    return normalized(state, path)


def _torch_load(path: Path, mmap: bool) -> dict:
    """mmap: tensors are read from the file as they are first touched (by the copy into the model or
    the optimizer, or never, for a checkpoint's small values alone), not into a second copy in memory
    first. torch.load checks no checksum either way. A file that cannot be mapped (torch's pre-zip
    format, a file system without mmap) is read whole."""
    with warnings.catch_warnings():  # torch warns about a foreign pickle's protocol: the error says enough
        warnings.simplefilter("ignore")
        if mmap:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError:
                raise
            except Exception:  # noqa: BLE001 - read whole below, which says what is wrong if anything is
                pass
        return torch.load(path, map_location="cpu", weights_only=True)


def plain_number(value, what: str, path) -> float | int:
    """A number read from a checkpoint as a Python int or float (0-dim tensors and numpy scalars included)."""
    if hasattr(value, "item") and not isinstance(value, (bool, int, float)):  # a tensor or a numpy scalar
        try:
            value = value.item()
        except (ValueError, RuntimeError, TypeError):  # more than one element
            raise CheckpointError(f"{path}: {what} must be a number, got {type(value).__name__}") from None
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


def check_resumable(state: dict, where) -> None:
    """A whole-model checkpoint's weights are those GPT(model_args) has, in its shapes, all finite, and it
    has an optimizer state: what load_state_dict needs and a run can train from, so that a checkpoint every
    worker would fail on (or diverge from at once) is refused first. The shapes are checked first, from the
    tensors alone; then the weights' values are read once (check_finite), the optimizer's never."""
    if SHARDED_DIR in state:
        return  # torch.distributed.checkpoint checks its own files as it loads them
    weights, optimizer = state.get("model"), state.get("optimizer")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{where}: 'model' must be a dict of tensors, got {type(weights).__name__}")
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):  # fmt: skip
        raise CheckpointError(f"{where}: 'optimizer' must be an optimizer's state_dict (state and param_groups)")
    args = architecture(state, where)
    if args["n_layer"] > len(weights):  # every block has tensors: and a model of 10**9 blocks takes long to build
        raise CheckpointError(
            f"{where}: model_args n_layer {args['n_layer']}, but 'model' holds {len(weights)} tensors"
        )
    expected = {k: tuple(v.shape) for k, v in GPT.on_meta(GPTConfig(**args)).state_dict().items()}
    saved = clean_state_dict(weights)
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: its weights are not those of its model_args ({len(missing)} missing"
            + (f", e.g. {missing[0]}" if missing else "")
            + f"; {len(unexpected)} unexpected"
            + (f", e.g. {shown_key(unexpected[0])}" if unexpected else "")
            + ")"
        )
    for name, shape in expected.items():
        value = saved[name]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"{where}: weight {name} is {got}, but its model_args make it {shape}")
    check_finite(saved, where)


class NonFiniteWeightsError(CheckpointError):
    """Weights holding nan or inf (a diverged run's): damaged for a resume, a sample or an export alike."""


def check_finite(weights: dict, where) -> None:
    """Refuse weights holding nan or inf, naming the first such weight. One pass over the weights: a mapped
    checkpoint's are read from the file here, and the load that follows finds them in the page cache."""
    for name, value in clean_state_dict(weights).items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and holds_nonfinite(value):
            raise NonFiniteWeightsError(f"{where}: weight {name} holds nan or inf values")


def holds_nonfinite(value: torch.Tensor) -> bool:
    """Whether a tensor holds nan or inf. nan and inf carry through a sum, so a finite sum clears the tensor
    at a tenth of isfinite().all()'s cost on a CPU; only a sum that is not finite, which finite values can
    also make by overflowing, pays for the exact test."""
    return not torch.isfinite(value.sum(dtype=torch.float32)) and not torch.isfinite(value).all()


def shown_key(key) -> str:
    text = str(key)
    return text if len(text) <= 60 else f"{text[:50]}..."


def read_checkpoint(path: str | Path, mmap: bool = False) -> tuple[dict, str]:
    """A checkpoint by path: a ckpt.pt file, or a folder holding ckpt.pt or a sharded checkpoint.

    For a sharded one (FSDP: torch.distributed.checkpoint files and train_state.pt), the dict holds
    train_state.pt's values and, under SHARDED_DIR, the folder the weights are loaded from.
    Returns the dict and the path it came from (the file, or the sharded folder)."""
    path = Path(path)
    if not path.is_dir() or path.name == CKPT_NAME:
        return load(path, mmap=mmap), str(path)
    if (path / CKPT_NAME).exists():
        path = path / CKPT_NAME
    elif (path / PROGRESS_NAME).exists():
        if not (path / DCP_METADATA).is_file():
            raise CheckpointError(f"{path} is a sharded checkpoint without its {DCP_METADATA} (an incomplete save)")
        state = load(path / PROGRESS_NAME, required=PROGRESS_KEYS)
        return {**state, SHARDED_DIR: str(path)}, str(path)
    else:
        raise CheckpointError(f"{path} holds no checkpoint (neither {CKPT_NAME} nor a sharded checkpoint)")
    return load(path, mmap=mmap), str(path)


def read_summary(path: str | Path) -> dict:
    """model_args (checked), iter_num and config of a checkpoint, without reading its weights: a local
    one through mmap, one in object storage (a URI) from its summary.json."""
    if is_uri(path):
        return read_remote_summary(str(path))
    state, _ = read_checkpoint(path, mmap=True)
    check_resumable(state, path)
    return {
        "model_args": architecture(state, path),
        "iter_num": state["iter_num"],
        "config": state.get("config") if isinstance(state.get("config"), dict) else {},
        "dataset": dataset_record(state),
    }


def dataset_record(state: dict) -> dict | None:
    """The checkpoint's record of its data (TrainState.dataset); None for one written before raygpt kept it."""
    record = state.get("dataset")
    return record if isinstance(record, dict) else None


def read_remote_summary(uri: str) -> dict:
    try:
        data = read_small_file(join_uri(uri, SUMMARY_NAME))
    except StorageError as e:
        raise CheckpointError(str(e)) from None
    if data is None:
        raise CheckpointError(f"{uri} has no {SUMMARY_NAME} (not a raygpt checkpoint, or an incomplete one)")
    try:
        state = json.loads(data)
        return {"model_args": architecture(state, uri), "iter_num": int(state["iter_num"]),
                "config": state.get("config") if isinstance(state.get("config"), dict) else {},
                "dataset": dataset_record(state)}  # fmt: skip
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{uri}/{SUMMARY_NAME} is damaged") from None


def download(uri: str) -> Path:
    """A checkpoint folder in object storage, copied to a local folder that stays until the process ends."""
    try:
        return download_folder(uri, Path(tempfile.mkdtemp(prefix="raygpt-checkpoint-")))
    except StorageError as e:
        raise CheckpointError(str(e)) from None


def whole_model_state(saved: dict) -> dict:
    """The weights of a checkpoint read by read_checkpoint, as one state dict on the CPU: a ckpt.pt's
    own, or a sharded checkpoint's gathered from its shards (needs no process group)."""
    if SHARDED_DIR not in saved:
        return clean_state_dict(saved["model"])
    import torch.distributed.checkpoint as dcp

    wanted = {"model": GPT(GPTConfig(**architecture(saved, saved[SHARDED_DIR]))).state_dict()}
    try:
        dcp.load(
            wanted, checkpoint_id=saved[SHARDED_DIR], no_dist=not torch.distributed.is_initialized()
        )  # reads the model's part only
    except Exception as e:  # noqa: BLE001 - a damaged or foreign folder fails in many ways
        raise CheckpointError(
            f"{saved[SHARDED_DIR]}: the sharded checkpoint cannot be read ({type(e).__name__})"
        ) from None
    return wanted["model"]


def newest_readable(paths: list, warn=print) -> tuple[Path | str, dict]:
    """Of `paths` (resume_candidates' order), the one whose summary reads at the latest iteration
    (by_iteration); damaged ones are skipped with a warning."""
    summaries, problems = {}, []
    for path in paths:
        try:
            summaries[path] = read_summary(path)
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint: {e}")
            problems.append(str(e))
    if not summaries:
        raise CheckpointError("no usable checkpoint to resume from: " + "; ".join(problems))
    newest = by_iteration(list(summaries), lambda path: summaries[path]["iter_num"])[0]
    return newest, summaries[newest]


def from_ray(checkpoint) -> tuple[dict, str]:
    """A ray.train.Checkpoint in remote storage, downloaded to a local folder that stays until the
    process ends (a sharded checkpoint's weights are read from it after this returns)."""
    directory = checkpoint.to_directory(tempfile.mkdtemp(prefix="raygpt-checkpoint-"))
    state, _ = read_checkpoint(directory, mmap=True)
    return state, str(checkpoint.path)  # where it is kept, not the temporary copy


class TrainState:
    """Everything a checkpoint holds: the model's weights, the optimizer and the gradient scaler, and
    where training is (iteration, best and last eval, the WandB run, and for data_order=nanogpt the
    random stream). `state_dict()` captures it whole (nanoGPT's ckpt.pt layout: model, optimizer,
    model_args, iter_num, best_val_loss, config, so nanoGPT's tools read it and raygpt resumes
    nanoGPT's); `sharded_state_dict()` and `progress()` are the two parts of a sharded checkpoint.
    `load_state_dict()` restores either kind into either kind of model (DDP's whole one or FSDP's
    shards), on any number of workers. Writing is the Checkpointer's."""

    def __init__(self, model, optimizer, scaler, model_args: dict, config: dict, keeps_random_stream: bool,
                 sharded: bool = False):  # fmt: skip
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.model_args, self.config = model_args, config
        self.keeps_random_stream = keeps_random_stream  # data_order=nanogpt: batches come from torch's RNG
        self.sharded = sharded  # the model's parameters are FSDP shards
        self.iter_num = 0
        self.best_val_loss = float("inf")
        self.last_eval = {"train": float("nan"), "val": float("nan")}
        self.wandb_run_id: str | None = None
        self.resumed_from: str | None = None
        self.dataset: dict | None = None  # core.data.dataset_identity of the data trained on, which a resume compares

    def record_eval(self, losses: dict[str, float]) -> bool:
        """Keep an eval's losses; returns whether val improved on the best so far (never for NaN)."""
        improved = losses["val"] < self.best_val_loss
        self.last_eval = losses
        self.best_val_loss = min(self.best_val_loss, losses["val"])
        return improved

    def summary(self) -> str:
        """summary.json: what read_summary needs, as JSON."""
        return json.dumps({"model_args": self.model_args, "iter_num": self.iter_num, "config": self.config,
                           "best_val_loss": self.best_val_loss, "dataset": self.dataset})  # fmt: skip

    def progress(self, next_batch) -> dict:
        """Everything but the weights and the optimizer. `next_batch` is the batch already drawn for the
        next step (kept with nanoGPT's order, whose random stream has moved past it)."""
        return {
            "scaler": self.scaler.state_dict(),
            "model_args": self.model_args,
            "iter_num": self.iter_num,
            "best_val_loss": self.best_val_loss,
            "config": self.config,
            "seed": self.config.get("seed"),
            "wandb_run_id": self.wandb_run_id,
            "last_eval": self.last_eval,
            "resumed_from": self.resumed_from,  # lineage, for debugging
            "dataset": self.dataset,
            "torch_rng_state": torch.get_rng_state() if self.keeps_random_stream else None,
            "next_batch": tuple(t.cpu() for t in next_batch) if self.keeps_random_stream else None,
        }

    def state_dict(self, next_batch) -> dict:
        """The whole state in one dict (a whole model: under FSDP use sharded_state_dict)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), **self.progress(next_batch)}

    def sharded_state_dict(self) -> dict:
        """Model and optimizer as torch.distributed.checkpoint saves them: each rank's own shards, keyed by
        parameter name (so that any number of ranks, sharded or not, can load them)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def load_state_dict(self, saved: dict, source: str):
        """Restore from a checkpoint read by read_checkpoint; returns the saved next batch (nanoGPT's
        order) or None."""
        if SHARDED_DIR in saved:
            self._load_sharded(saved[SHARDED_DIR])
        elif self.sharded:
            self._load_whole_into_shards(saved)
        else:
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

    def _load_sharded(self, directory: str) -> None:
        """A sharded checkpoint into this model, whatever its sharding: DCP reads the slices each rank needs."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        wanted = self.sharded_state_dict()
        try:
            dcp.load(wanted, checkpoint_id=directory, no_dist=not torch.distributed.is_initialized())
        except Exception as e:  # noqa: BLE001 - a damaged or foreign folder fails in many ways
            raise CheckpointError(f"{directory}: the sharded checkpoint cannot be read ({type(e).__name__})") from None
        set_state_dict(self.model, self.optimizer, model_state_dict=wanted["model"],
                       optim_state_dict=wanted["optimizer"])  # fmt: skip

    def _load_whole_into_shards(self, saved: dict) -> None:
        """A whole-model checkpoint (ckpt.pt) into FSDP shards: each rank keeps its slice of every tensor.
        The optimizer's state is keyed by parameter position in ckpt.pt; DCP's loader wants names."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        whole = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, clean_state_dict(saved["model"]), options=whole)
        name_of = {id(param): name for name, param in self.model.named_parameters()}
        by_name = {"state": {}, "param_groups": []}
        for saved_group, group in zip(saved["optimizer"]["param_groups"], self.optimizer.param_groups):
            names = [name_of[id(param)] for param in group["params"]]
            for position, name in zip(saved_group["params"], names):
                if position in saved["optimizer"]["state"]:
                    by_name["state"][name] = saved["optimizer"]["state"][position]
            by_name["param_groups"].append({**saved_group, "params": names})
        set_optimizer_state_dict(self.model, self.optimizer, by_name, options=whole)


def remove_leftovers(out_dir: str | Path) -> list[Path]:
    """What a run killed while saving leaves in out_dir: a half-written ckpt.pt and upload folders."""
    out_dir = Path(out_dir)
    removed = remove_orphaned_temporaries(out_dir, CKPT_NAME)
    for upload_dir in out_dir.glob(f"{UPLOAD_PREFIX}*") if out_dir.is_dir() else ():
        if upload_dir.is_dir():
            shutil.rmtree(upload_dir, ignore_errors=True)
            removed.append(upload_dir)
    return removed


def resume_candidates(ray_latest=None, ray_older=None, fallback: str | Path | None = None) -> list:
    """The one set of a run's checkpoints a resume chooses from, by the launcher deciding a rerun and by a
    restarted worker alike, in the order that breaks a tie: Ray's latest checkpoint of the run (a
    ray.train.Checkpoint, a folder or a URI), then the run's older ones newest first (`ray_older`; by
    default the ones beside a latest in a local folder), then `fallback` (out_dir/ckpt.pt, or the
    checkpoint the launcher chose). by_iteration then puts the latest iteration first: a checkpoint
    written elsewhere (out_dir/ckpt.pt by local mode) may be newer than Ray's latest."""
    candidates: list = []
    if ray_latest is not None:
        latest = local_folder(ray_latest)
        if ray_older is None:
            ray_older = older_beside(latest) if latest is not None else []
        candidates += [ray_latest if latest is None else latest, *ray_older]
    if fallback is not None:
        fallback = fallback if is_uri(fallback) else Path(fallback)
        if fallback not in candidates:  # the launcher's choice may be one of Ray's
            candidates.append(fallback)
    return candidates


def by_iteration(candidates: list, iteration_of) -> list:
    """`candidates` (resume_candidates' order) with the latest iteration first, ties kept in that order.
    iteration_of(candidate) is None where it cannot be read: those go last, tried (and reported) last."""
    iterations = [iteration_of(candidate) for candidate in candidates]
    order = sorted(range(len(candidates)), key=lambda i: (iterations[i] is None, -(iterations[i] or 0), i))
    return [candidates[i] for i in order]


def iteration_of(candidate) -> int | None:
    """A checkpoint's iteration, read cheaply: from its summary.json where it has one (Ray's checkpoints),
    else from the mapped file's small values; None where neither reads."""
    try:
        if is_uri(candidate):
            return read_remote_summary(str(candidate))["iter_num"]
        folder = candidate if isinstance(candidate, Path) else local_folder(candidate)
        if folder is None:  # a ray.train.Checkpoint in object storage
            with candidate.filesystem.open_input_stream(f"{candidate.path}/{SUMMARY_NAME}") as stream:
                return int(json.loads(stream.read())["iter_num"])
        if (folder / SUMMARY_NAME).is_file():
            return int(json.loads((folder / SUMMARY_NAME).read_text())["iter_num"])
        return read_checkpoint(folder, mmap=True)[0]["iter_num"]
    except Exception:  # noqa: BLE001 - unreadable here: loading it says why, in its turn
        return None


def local_folder(ray_checkpoint) -> Path | None:
    """A Ray checkpoint's folder where it is local (a Path, or a ray.train.Checkpoint on the local
    filesystem), else None (object storage)."""
    if isinstance(ray_checkpoint, Path):
        return ray_checkpoint
    path = Path(getattr(ray_checkpoint, "path", ""))
    if getattr(getattr(ray_checkpoint, "filesystem", None), "type_name", "") == "local" and path.parent.is_dir():
        return path
    return None


def older_beside(latest: Path) -> list[Path]:
    """The run's checkpoints older than `latest`, newest first: Ray names them checkpoint_<time> in one folder."""
    older = (p for p in latest.parent.glob("checkpoint_*") if p.is_dir() and p.name < latest.name)
    return sorted(older, reverse=True)


def load_resume_state(ray_checkpoint=None, fallback: str | Path | None = None, warn=print,
                      last_resort: Path | None = None) -> tuple[dict, str]:  # fmt: skip
    """The checkpoint at the latest iteration that loads (resume_candidates, by_iteration), then
    `last_resort` (not compared by iteration: it is read only when none of the others loads). A damaged one
    is reported and skipped, never half-loaded; check_resumable skips what read_summary refuses in the launcher."""
    candidates = by_iteration(resume_candidates(ray_checkpoint, fallback=fallback), iteration_of)
    if last_resort is not None and last_resort not in candidates:
        candidates.append(last_resort)
    for candidate in candidates:
        try:
            state, where = read_any(candidate)
            check_resumable(state, where)
            return state, where
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint: {e}")
    raise CheckpointError(
        "no usable checkpoint to resume from (" + ", ".join(str(getattr(c, "path", c)) for c in candidates) + ")"
    )


def read_any(candidate) -> tuple[dict, str]:
    """A resume candidate read (mapped where local): a local path, a URI (downloaded), or a Ray Checkpoint."""
    if isinstance(candidate, Path):
        return read_checkpoint(candidate, mmap=True)
    if is_uri(candidate):
        state, _ = read_checkpoint(download(str(candidate)), mmap=True)
        return state, str(candidate)
    return from_ray(candidate)
