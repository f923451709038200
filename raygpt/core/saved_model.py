"""A trained model from a checkpoint, with its tokenizer: what raygpt.sample, raygpt.eval and the validation
tasks of a training run (worker/validation.py) load.

A checkpoint is a ckpt.pt, a sharded checkpoint's folder, a Ray checkpoint folder, an out_dir holding a
ckpt.pt, or a Ray run folder (its latest checkpoint), local or at a URI. Its tokenizer is the one it was
trained with: the character table of its dataset's meta.json (or nanoGPT's meta.pkl), or GPT-2 BPE for a
model of GPT-2's vocabulary; never a guess. The messages name the command-line options (--meta) of the
tools that load models this way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from raygpt.core import checkpoint
from raygpt.core.model import GPT, GPTConfig
from raygpt.core.tokenizer import (
    GPT2_VOCAB_SIZE,
    PADDED_GPT2_VOCAB_SIZE,
    Tokenizer,
    load_meta,
    vocabulary,
    vocabulary_digest,
)
from raygpt.errors import RaygptError, one_line
from raygpt.storage.datasets import check_remote_dataset, dataset_uri
from raygpt.storage.uri import StorageError, is_uri, join_uri, list_folders

WHAT_CHECKPOINT_IS = (
    f"pass a Ray checkpoint folder, a {checkpoint.CKPT_NAME} file, a training run's out_dir or a Ray run folder"
)
FIX_META = "pass the dataset's with --meta PATH/meta.json"


class SavedModelError(RaygptError, ValueError):
    """A checkpoint, or its tokenizer, that cannot be loaded as given; the message is one line."""


RAY_CHECKPOINT_PREFIX = "checkpoint_"  # Ray names a run's checkpoints checkpoint_<time>, oldest first


def locate_checkpoint(given: str, say: Callable[[str], None]) -> Path:
    """The local checkpoint that --checkpoint (or --out-dir) names, for checkpoint_file: a file or folder as
    it is, or a Ray run folder's (storage_path/run_name) latest checkpoint, by iteration, as a resume
    chooses. One at a URI is downloaded first: only the chosen checkpoint of a run folder. `say` tells
    which checkpoint a run folder gave, and of a download."""
    if is_uri(given):
        folders = list_folders(given, RAY_CHECKPOINT_PREFIX)
        chosen = latest_of_run(given, [join_uri(given, name) for name in folders], say) or given
        say(f"downloading {chosen}")
        return Path(checkpoint.download(chosen))
    path = Path(given).expanduser()
    if not path.is_dir():
        return path
    out_ckpt = path / checkpoint.CKPT_NAME
    reported = sorted(p for p in path.glob(f"{RAY_CHECKPOINT_PREFIX}*") if p.is_dir())
    return latest_of_run(path, reported, say, out_ckpt if out_ckpt.is_file() else None) or path


def latest_of_run(folder: Path | str, reported: list, say: Callable[[str], None], out_ckpt: Path | None = None):
    """Of a Ray run folder's checkpoints (oldest first; and a ckpt.pt beside them, if the folder is also an
    out_dir), the one at the latest iteration; None when it holds none."""
    if not reported:
        return None
    candidates = checkpoint.resume_candidates(reported[-1], reported[-2::-1], fallback=out_ckpt)
    latest = checkpoint.by_iteration(candidates, checkpoint.iteration_of)[0]
    iteration = checkpoint.iteration_of(latest)
    at = f" (iter {iteration})" if iteration is not None else ""
    say(f"{latest}{at} is the latest checkpoint of Ray run folder {folder}")
    return latest


def checkpoint_file(path: Path) -> Path:
    """The ckpt.pt that --checkpoint or --out-dir names: the file itself, or the one in the folder."""
    if not path.exists():
        raise SavedModelError(f"no checkpoint at {path}: {WHAT_CHECKPOINT_IS}")
    if not path.is_dir():
        return path
    if (path / checkpoint.CKPT_NAME).exists():
        return path / checkpoint.CKPT_NAME
    if (path / checkpoint.PROGRESS_NAME).exists():  # a sharded (FSDP) checkpoint: read from its shards
        return path
    raise SavedModelError(f"{path} holds no {checkpoint.CKPT_NAME}: {WHAT_CHECKPOINT_IS}")


def load_checkpoint_model(ckpt_path: Path) -> tuple[GPT, dict, dict | None]:
    """The model of a checkpoint (a ckpt.pt, or a sharded checkpoint's folder), its training config, and
    its record of the data it was trained on (None: written before raygpt kept one)."""
    state, _ = checkpoint.read_checkpoint(ckpt_path, mmap=True)  # tensors are read as load_state_dict copies them
    model_args = checkpoint.architecture(state, ckpt_path)
    if not isinstance(state.get("model", {}), dict):
        raise SavedModelError(
            f"{ckpt_path}: 'model' must hold the weights by name, got {type(state['model']).__name__}"
        )
    model = GPT(GPTConfig(**model_args, dropout=0.0))
    try:
        model.load_state_dict(checkpoint.whole_model_state(state))
    except RuntimeError as e:  # torch lists every missing, unexpected or misshapen weight: name the first
        detail = [line.strip() for line in str(e).splitlines() if line.strip()][1:2] or [one_line(str(e))]
        raise SavedModelError(f"{ckpt_path}: its weights do not fit its model_args: {detail[0]}") from None
    try:  # a diverged run's weights: every token's probability would be nan (the model's copy: no second read)
        checkpoint.check_finite(model.state_dict(), ckpt_path)
    except checkpoint.NonFiniteWeightsError as e:
        raise SavedModelError(f"{e}; sample from an earlier checkpoint") from None
    config = state.get("config")
    return model, config if isinstance(config, dict) else {}, checkpoint.dataset_record(state)


def dataset_meta(config: dict, meta_option: str | None) -> tuple[dict | None, str | None]:
    """The dataset's vocabulary (tokenizer.load_meta) and the folder it was looked for in: --meta's, else
    the training config's data_dir/dataset (data/<dataset> for a nanoGPT config, as nanoGPT's sample.py).
    A data_dir URI (s3://...) is read remotely."""
    if meta_option:
        path = Path(meta_option).expanduser()
        if path.is_dir():
            folder = path
        elif path.is_file() and path.name in ("meta.json", "meta.pkl"):
            folder = path.parent
        elif not path.exists():
            raise SavedModelError(f"--meta {path}: no such file or folder")
        else:
            raise SavedModelError(f"--meta {path}: expected a meta.json or meta.pkl, or the dataset folder holding one")
        meta = load_meta(folder)
        if meta is None:
            raise SavedModelError(f"--meta {path}: the folder holds no meta.json or meta.pkl")
        return meta, str(folder)
    if not config.get("dataset"):
        return None, None
    data_dir = str(config.get("data_dir") or "data")
    if is_uri(data_dir):
        uri = dataset_uri(data_dir, config["dataset"])
        try:
            return vocabulary(check_remote_dataset(uri)), uri
        except StorageError:
            return None, uri
    folder = f"{data_dir.rstrip('/')}/{config['dataset']}"
    return load_meta(Path(folder)), folder


def tokenizer_for(vocab_size: int, meta: dict | None, folder: str | None, trained_on: dict | None = None) -> Tokenizer:
    """The tokenizer the model was trained with. A model of GPT-2's vocabulary without a meta.json is
    GPT-2 BPE, as in nanoGPT; any other vocabulary needs its dataset's table, never a guess. `trained_on`:
    the checkpoint's record of its data, whose vocabulary the table must be (a dataset prepared again from
    another text has as many tokens, each id another character)."""
    recorded = (trained_on or {}).get("vocabulary_sha256")
    if recorded and meta is not None and vocabulary_digest(meta) != recorded:
        raise SavedModelError(
            f"{folder} describes another vocabulary than the one the checkpoint was trained on (its token ids "
            f"mean other tokens: the dataset was prepared again from another text); {FIX_META}"
        )
    if meta is None:
        if vocab_size in (GPT2_VOCAB_SIZE, PADDED_GPT2_VOCAB_SIZE):
            return Tokenizer.from_meta(None)
        looked = f"no meta.json or meta.pkl in {folder}" if folder else "its training config names no dataset"
        raise SavedModelError(
            f"the checkpoint's vocabulary has {vocab_size} tokens, not GPT-2's, and {looked}: {FIX_META}"
        )
    tokenizer = Tokenizer.from_meta(meta)
    # A char model's vocabulary is its table; a BPE model's may be padded past GPT-2's (50304).
    fits = tokenizer.vocab_size == vocab_size if tokenizer.name == "char" else tokenizer.vocab_size <= vocab_size
    if not fits:
        raise SavedModelError(
            f"{folder} describes a {tokenizer.name} vocabulary of {tokenizer.vocab_size} tokens but the checkpoint's "
            f"model has {vocab_size}: it is another dataset's; {FIX_META}"
        )
    return tokenizer
