"""The launcher's checks that need the disk or the environment but no cluster, run before Ray starts so
that a bad input costs no Ray start: paths made absolute (a Ray job's out_dir kept past the job, and
--fresh), the Ray address, the output folders and the run lock, the dataset (prepared here when the
launcher knows how), the resume decision, GPT-2's weights, the evals' data, wandb, and torch's bytecode.
`preflight` runs them in order."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from raygpt.config.schema import (
    BPB,
    HELLASWAG,
    HELLASWAG_CACHE,
    INIT_CHOICES,
    MODEL_KEYS,
    TrainConfig,
    check_name_lengths,
    eval_tasks,
)
from raygpt.core import checkpoint
from raygpt.core.data import dataset_identity, validate_dataset
from raygpt.core.evals import EvalError, encode_examples
from raygpt.core.hf import HF_REPOS, check_gpt2_available, check_gpt2_folder
from raygpt.core.saved_model import tokenizer_for
from raygpt.core.tokenizer import GPT2_VOCAB_SIZE, load_meta, read_meta, scratch_vocab_size, vocabulary
from raygpt.driver.bytecode import packages_without_bytecode
from raygpt.driver.identity import RunIdentity, identify_run, ray_run_folder, read_record
from raygpt.driver.plan import ResumePoint, check_workers, plan_resume, ray_checkpoint_dirs
from raygpt.driver.ray_cluster import check_address, given_address
from raygpt.driver.runlock import RunLock, lock_run
from raygpt.errors import LaunchError
from raygpt.prep.hellaswag import cached_hellaswag
from raygpt.prep.shakespeare import SHAKESPEARE_SETS
from raygpt.ray_compat import job_working_dir
from raygpt.storage.datasets import DatasetNotFoundError, check_remote_dataset, dataset_uri
from raygpt.storage.files import remove_empty_folders
from raygpt.storage.uri import StorageError, check_local_path, check_storage_path, is_uri, storage_root
from raygpt.worker.validation import read_eval_examples


@dataclass(frozen=True)
class Checked:
    """A config that passed preflight, and what preflight holds and made for its run."""

    cfg: TrainConfig  # its paths absolute
    run_name: str
    identity: RunIdentity  # recorded (identity.record_run) once the launch is accepted
    resume: ResumePoint | None  # the checkpoint the run continues from; None: a new run
    lock: RunLock  # held until released (or the process ends): one run at a time on out_dir and run name
    created: list[Path]  # the folders made for the run, deepest first

    def discard(self) -> None:
        """Undo what preflight made: a refused launch leaves no lock file or empty folder behind."""
        self.lock.discard()
        remove_empty_folders(self.created)


def preflight(cfg: TrainConfig, explicit_keys, prepare_input: str | None, address: str | None = None,
              new_runs: bool = False) -> Checked:  # fmt: skip
    """Every check that needs no cluster, in order; the run is locked from the output checks on. `address`:
    the --address given (None: RAY_ADDRESS, if set). new_runs: the config is a sweep's base (plan_resume)."""
    cfg = absolute_paths(cfg)
    if cfg.num_workers and not cfg.local_mode:  # a count given: checked now, not after Ray has started
        check_workers(cfg, cfg.num_workers)
    address, source = given_address(address)
    if address and not cfg.local_mode:  # also where this process is already connected (a notebook, tests)
        check_address(address, source)
    created = check_outputs(cfg)
    lock = None
    try:
        identity = identify_run(cfg, new_runs)
        run_name = identity.run_name
        cfg = cfg.replace(run_name=run_name)  # out_dir's run may have its own (an earlier --run_name)
        lock = lock_run(cfg.out_dir, cfg.storage_path, run_name, ray_run=not cfg.local_mode)
        for leftover in checkpoint.remove_leftovers(cfg.out_dir):
            print(f"raygpt: removed {leftover.name}, left by a run killed while saving", flush=True)
        meta = dataset_meta(cfg, prepare_input)
        resume = plan_resume(cfg, run_name, explicit_keys, meta, new_runs, identity.ray_run_is_ours,
                             dataset=current_dataset(cfg, meta))  # fmt: skip
        cfg = shaped_as_checkpoint(cfg, resume)
        vocab_size = model_vocab_size(cfg, resume, meta)
        if not is_uri(cfg.data_dir):  # a dataset at a URI is checked whole by each node once it has a copy
            validate_dataset(Path(cfg.data_dir) / cfg.dataset, cfg.block_size, vocab_size)
        check_evals(cfg, meta, vocab_size)
        check_wandb(cfg)
        check_bytecode()
    except BaseException:  # a refusal (or Ctrl-C) leaves no lock file or empty folder behind
        if lock is not None:
            lock.discard()
        remove_empty_folders(created)
        raise
    return Checked(cfg, run_name, identity, resume, lock, created)


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Ray workers chdir into a session folder, so every path must be absolute in the driver: the folders
    of out_dir, data_dir, a local storage_path, and an init_from GPT-2 folder."""
    cfg = kept_after_the_job(cfg)

    def resolve(key: str) -> str:
        path = getattr(cfg, key)
        if is_uri(path) and key == "out_dir":
            raise LaunchError(f"out_dir {path} is a URI, but out_dir is each node's local folder: "
                              "pass a local --out_dir, and the URI as --storage_path")  # fmt: skip
        if is_uri(path):
            return path
        check_local_path(path, key)  # s3:/bucket resolved would be a local folder named 's3:'
        check_name_lengths(key, os.path.abspath(Path(path).expanduser()))  # a relative path grows here
        return str(Path(path).expanduser().resolve())

    changes = dict(out_dir=resolve("out_dir"), data_dir=resolve("data_dir"))
    if cfg.storage_path:
        changes["storage_path"] = resolve("storage_path")
    if cfg.init_from not in INIT_CHOICES:  # a local GPT-2 folder: checked here, as the config reads no disk
        changes["init_from"] = check_gpt2_folder(cfg.init_from, cfg.block_size)
    sources = eval_tasks(cfg.evals).values()
    if sources:  # a .jsonl file's path, read where the loop runs (a Tune trial's folder) or by the launcher
        changes["evals"] = ",".join(
            s if s in (HELLASWAG, BPB) else str(Path(s).expanduser().resolve()) for s in sources
        )
    return cfg.replace(**changes)


def kept_after_the_job(cfg: TrainConfig) -> TrainConfig:
    """A Ray job's driver (`ray job submit --working-dir`) runs in Ray's copy of the working dir, deleted
    when the job ends: a relative out_dir there would lose its ckpt.pt, eval.json and metrics. It goes into
    the run's folder of Ray's storage on this machine instead (a local storage_path, else ~/ray_results),
    where the same job submitted again finds it. A relative storage_path would be lost too: refused."""
    if job_working_dir() is None:
        return cfg
    storage = cfg.storage_path
    if storage and not is_uri(storage) and not Path(storage).expanduser().is_absolute():
        raise LaunchError(f"storage_path {storage} is relative, but a Ray job runs in a copy of its working dir "
                          "that Ray deletes when the job ends: pass an absolute --storage_path or a URI")  # fmt: skip
    if Path(cfg.out_dir).expanduser().is_absolute():
        return cfg
    name = Path(os.path.abspath(cfg.out_dir)).name
    recorded = recorded_out_dir(cfg, cfg.run_name or name)
    if recorded is not None:  # the run this config names already has an out_dir here: it goes on there
        out_dir, why = recorded, "the out_dir its Ray run was recorded with"
    else:
        local_storage = Path(storage_root("" if is_uri(storage) else storage)).expanduser()
        out_dir, why = local_storage / (cfg.run_name or name) / name, "a folder of its Ray run"
    print(f"raygpt: out_dir {cfg.out_dir} is {out_dir}, {why}: a Ray job runs in a copy of its working dir that "
          "Ray deletes when the job ends (pass an absolute --out_dir to choose another)", flush=True)  # fmt: skip
    return cfg.replace(out_dir=str(out_dir))


def recorded_out_dir(cfg: TrainConfig, run_name: str) -> Path | None:
    """The absolute out_dir on this machine that Ray run `run_name`'s record names (the run was launched
    here before, as a job or not), or None."""
    try:
        record = read_record(ray_run_folder(cfg, run_name))
    except StorageError:
        return None
    out_dir = record.get("out_dir") if record else None
    if isinstance(out_dir, str) and Path(out_dir).is_absolute() and Path(out_dir).is_dir():
        return Path(out_dir)
    return None


def fresh_out_dir(cfg: TrainConfig) -> TrainConfig:
    """--fresh: the first `<out_dir>-N` whose folder and Ray run are both unused; the old run is kept."""
    base = Path(cfg.out_dir)
    for n in range(2, 10_000):
        candidate = base.with_name(f"{base.name}-{n}")
        run_name = f"{cfg.run_name}-{n}" if cfg.run_name else candidate.name
        check_name_lengths("--fresh's out_dir", str(candidate))  # the '-N' may make a name the OS refuses
        if not candidate.exists() and not ray_checkpoint_dirs(cfg, run_name):
            print(f"raygpt: --fresh: a new run '{run_name}' in {candidate}; {base} is kept as it was", flush=True)
            return cfg.replace(out_dir=str(candidate), run_name=cfg.run_name and run_name)
    raise LaunchError(f"--fresh found no free name beside {base}")


def is_prepared(dataset_dir: Path) -> bool:
    """All of a dataset's files are there (a failed preparation may have left a partial folder)."""
    has_meta = (dataset_dir / "meta.json").is_file() or (dataset_dir / "meta.pkl").is_file()
    return has_meta and all((dataset_dir / f"{split}.bin").is_file() for split in ("train", "val"))


def check_outputs(cfg: TrainConfig) -> list[Path]:
    """out_dir and a local storage_path exist (made here) and are writable folders. Returns the folders
    made, deepest first, to remove if the launch is refused. A storage_path URI must name a bucket that
    opens, a local one hold no file on its way (local mode keeps no Ray storage)."""
    if not cfg.local_mode:
        check_storage_path(cfg.storage_path)
    created: list[Path] = []
    try:
        for name in ("out_dir", "storage_path"):
            path = getattr(cfg, name)
            if path and "://" not in path:
                created += make_folder(name, Path(path))
    except LaunchError:
        remove_empty_folders(created)
        raise
    return created


def make_folder(name: str, path: Path) -> list[Path]:
    """mkdir -p `path` (the folder of config key `name`); returns the folders it made, deepest first."""
    missing = [p for p in (path, *path.parents) if not os.path.lexists(p)]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise LaunchError(f"{name} {path} is a file, not a folder: pass another --{name}") from None
    except OSError as e:
        remove_empty_folders([p for p in missing if p.is_dir()])
        raise LaunchError(f"cannot create {name} {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        remove_empty_folders(missing)
        raise LaunchError(f"{name} {path} is not writable: pass another --{name} or change its permissions")
    return missing


def check_evals(cfg: TrainConfig, meta: dict | None, vocab_size: int) -> None:
    """The evals' data, before Ray starts: HellaSwag fetched once (no eval downloads mid-run), each file read
    (its first eval_examples), and every example in tokens the model has (a character-level model lacks
    most of HellaSwag's characters)."""
    sources = eval_tasks(cfg.evals)
    if HELLASWAG in sources.values():
        cached_hellaswag(HELLASWAG_CACHE, "--evals=PATH/hellaswag_val.jsonl (its metrics are then hellaswag_val's)")
    for source in sources.values():
        if source not in (HELLASWAG, BPB) and not Path(source).is_file():
            raise LaunchError(f"evals: no file {source}: give hellaswag, bpb or a .jsonl file in HellaSwag's format")
    examples = read_eval_examples(cfg)
    if not examples:  # bpb alone: val.bin is the dataset's, already checked
        return
    dataset = dataset_uri(cfg.data_dir, cfg.dataset) if is_uri(cfg.data_dir) else Path(cfg.data_dir) / cfg.dataset
    tokenizer = tokenizer_for(vocab_size, vocabulary(meta) if meta else None, str(dataset))
    for name, task in examples.items():
        try:
            encode_examples(task, tokenizer, cfg.block_size, vocab_size)
        except EvalError as e:
            raise LaunchError(f"evals {name}: {e}") from None


def check_wandb(cfg: TrainConfig) -> None:
    """wandb_log needs the package and, unless WandB runs offline, credentials: find out before Ray starts."""
    if not cfg.wandb_log:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise LaunchError("wandb_log=True needs the wandb package: pip install wandb") from None
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")):
        raise LaunchError(
            "wandb_log=True but WandB has no credentials: run `wandb login`, set WANDB_API_KEY, "
            "or set WANDB_MODE=offline"
        )


def check_bytecode() -> None:
    """A container trap: torch installed without compiled bytecode (`pip install --no-compile`) where
    Python may not write any (PYTHONDONTWRITEBYTECODE=1). Every worker process, and every one Ray
    restarts after a failure, then compiles torch's Python source again before it can train."""
    folders = packages_without_bytecode()
    if folders:
        names = ", ".join(Path(folder).name for folder in folders)
        print(f"raygpt: warning: {names} have no compiled bytecode (.pyc) here and Python writes none "
              "(PYTHONDONTWRITEBYTECODE, or read-only folders): each worker process, and each restart, "
              f"compiles them anew, seconds every time. Once: python -m compileall -q -j 0 {' '.join(folders)}",
              flush=True)  # fmt: skip


def dataset_meta(cfg: TrainConfig, prepare_input: str | None) -> dict | None:
    """The dataset's meta (None: a local dataset without one), once it is there: a missing shakespeare
    dataset is prepared first, from `prepare_input` or a download."""
    if is_uri(cfg.data_dir):
        return remote_dataset_meta(cfg, prepare_input)
    return local_dataset_meta(cfg, prepare_input)


def shaped_as_checkpoint(cfg: TrainConfig, resume: ResumePoint | None) -> TrainConfig:
    """A rerun keeps its checkpoint's shape: the model keys it left at their defaults take the checkpoint's
    values (one it set otherwise was refused), so that the data check, the workers' batches and
    tokens-per-iteration line, and the config saved with the next checkpoint all mean the model trained."""
    if resume is None:
        return cfg
    return cfg.replace(**{key: resume.summary["model_args"][key] for key in MODEL_KEYS})


def current_dataset(cfg: TrainConfig, meta: dict | None) -> dict:
    """The dataset's identity (core.data.dataset_identity), which a resume compares with its checkpoint's:
    a URI's from its meta.json (`meta`), a local folder's from its files."""
    if is_uri(cfg.data_dir):
        return dataset_identity(meta)
    dataset_dir = Path(cfg.data_dir) / cfg.dataset
    return dataset_identity(read_meta(dataset_dir) if dataset_dir.is_dir() else None, dataset_dir)


def model_vocab_size(cfg: TrainConfig, resume: ResumePoint | None, meta: dict | None) -> int:
    """The vocab_size the model will have, which the dataset's token ids must fit: the resumed
    checkpoint's, GPT-2's (its weights found now, not by every worker after Ray has started), or the
    dataset's."""
    if resume is not None:
        return resume.summary["model_args"]["vocab_size"]
    if cfg.init_from.startswith("gpt2") or Path(cfg.init_from).is_dir():
        if cfg.init_from in HF_REPOS:
            try:
                check_gpt2_available(cfg.init_from)
            except RuntimeError as e:
                raise LaunchError(str(e)) from None
        return GPT2_VOCAB_SIZE
    return scratch_vocab_size(meta)


def local_dataset_meta(cfg: TrainConfig, prepare_input: str | None) -> dict | None:
    dataset_dir = Path(cfg.data_dir) / cfg.dataset
    if cfg.dataset in SHAKESPEARE_SETS and not is_prepared(dataset_dir):
        from raygpt.prep.dataset import prepare_dataset

        print(f"dataset {cfg.dataset} not found in {cfg.data_dir}: preparing it", flush=True)
        prepare_dataset(cfg.dataset, cfg.data_dir, input_path=prepare_input, input_flag="--prepare-input")
    try:
        return load_meta(dataset_dir) if dataset_dir.is_dir() else None
    except ValueError as e:
        raise LaunchError(str(e)) from None


def remote_dataset_meta(cfg: TrainConfig, prepare_input: str | None) -> dict:
    """A dataset in object storage: its meta.json read and its files' sizes checked, without downloading."""
    uri = dataset_uri(cfg.data_dir, cfg.dataset)
    try:
        remote = check_remote_dataset(uri)
    except DatasetNotFoundError:
        if cfg.dataset not in SHAKESPEARE_SETS:
            raise
        from raygpt.prep.dataset import prepare_dataset

        print(f"dataset {cfg.dataset} not found in {cfg.data_dir}: preparing it there", flush=True)
        prepare_dataset(cfg.dataset, cfg.data_dir, input_path=prepare_input, input_flag="--prepare-input")
        remote = check_remote_dataset(uri)
    train_tokens = remote["files"]["train.bin"]["bytes"] // 2
    if train_tokens < cfg.block_size + 1:
        raise LaunchError(f"{uri}/train.bin has {train_tokens} tokens, too few for block_size {cfg.block_size}")
    return remote  # the vocabulary, and the files' records that current_dataset reads
