"""`python -m raygpt.export CHECKPOINT [--ckpt FILE] [--hf DIR]`: any checkpoint as nanoGPT's ckpt.pt
or a Hugging Face GPT-2 folder.

CHECKPOINT is a ckpt.pt, a Ray checkpoint folder (whole or sharded by FSDP), a run's out_dir, or a Ray
run folder (storage_path/run_name, local or in object storage), whose checkpoint at the latest iteration is
exported (chosen as a resume chooses it). A sharded checkpoint is gathered on the CPU without any process
group. Weights holding nan or inf are refused, as resume and sample refuse them, unless --allow-nonfinite.
--hf needs safetensors (the [hf] extra), checked before anything is read or written.

    python -m raygpt.export ~/ray_results/out --ckpt out-nanogpt/ckpt.pt   # the run's latest checkpoint
    python -m raygpt.export out-shakespeare-char-cpu --hf gpt2-shakespeare   # GPT2LMHeadModel.from_pretrained
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from raygpt.core import checkpoint
from raygpt.core.hf import HF_FILES, hf_config, hf_weights
from raygpt.core.model import GPT, GPTConfig, clean_state_dict
from raygpt.core.saved_model import RAY_CHECKPOINT_PREFIX, locate_checkpoint
from raygpt.driver.identity import read_record
from raygpt.errors import OneLineParser, RaygptError, run_cli
from raygpt.storage.files import write_atomic, write_text_atomic
from raygpt.storage.uri import is_uri


class ExportError(RaygptError):
    """A checkpoint or an output that cannot be exported; the message is one line."""


def whole_checkpoint(saved: dict) -> dict:
    """nanoGPT's ckpt.pt layout for any checkpoint: a sharded one's weights and optimizer state gathered
    into a whole model and an optimizer whose state is keyed by position, as nanoGPT's train.py loads it."""
    if checkpoint.SHARDED_DIR not in saved:
        return {key: value for key, value in saved.items() if key != checkpoint.SHARDED_DIR}
    config = saved.get("config") or {}
    model = GPT(GPTConfig(**checkpoint.architecture(saved, saved[checkpoint.SHARDED_DIR])))
    optimizer = model.configure_optimizers(
        config.get("weight_decay", 0.1),
        config.get("learning_rate", 6e-4),
        (config.get("beta1", 0.9), config.get("beta2", 0.95)),
        "cpu",
        verbose=False,
    )
    state = checkpoint.TrainState(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), {}, {}, False)
    state.load_state_dict(saved, saved[checkpoint.SHARDED_DIR])
    progress = {key: value for key, value in saved.items() if key != checkpoint.SHARDED_DIR}
    return {**progress, "model": model.state_dict(), "optimizer": optimizer.state_dict()}


def check_hf_installed() -> None:
    """--hf writes model.safetensors: refused before anything is read or written where safetensors is missing."""
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        raise ExportError(
            '--hf writes model.safetensors, and safetensors is not installed: pip install -e ".[hf]" in the '
            "raygpt folder (the [hf] extra), or pip install safetensors"
        ) from None


def export_hf(model_state: dict, model_args: dict, directory: Path) -> None:
    from safetensors.torch import save  # check_hf_installed has found it

    weights = hf_weights(model_state, model_args)
    directory.mkdir(parents=True, exist_ok=True)
    config_json, weights_file = (directory / name for name in HF_FILES)
    write_text_atomic(config_json, json.dumps(hf_config(model_args), indent=2) + "\n")
    data = save(weights, metadata={"format": "pt"})
    write_atomic(weights_file, lambda f: f.write(data))


def check_weights(model_state: dict, where: str, allow_nonfinite: bool) -> None:
    """Weights holding nan or inf are refused (resume and sample refuse them too), or with --allow-nonfinite
    written after a warning."""
    try:
        checkpoint.check_finite(model_state, where)
    except checkpoint.NonFiniteWeightsError as e:
        if not allow_nonfinite:
            raise ExportError(
                f"{e}; export an earlier checkpoint, or pass --allow-nonfinite to write it anyway"
            ) from None
        print(f"warning: {e}; writing it all the same (--allow-nonfinite)", file=sys.stderr)


def parse_args(argv: list[str]):
    parser = OneLineParser(
        prog="python -m raygpt.export",
        usage="%(prog)s CHECKPOINT [--ckpt FILE] [--hf DIR] [--allow-nonfinite]",
        description="Write any raygpt checkpoint (a ckpt.pt, a Ray checkpoint folder, sharded or not, a run's "
        "out_dir, or a Ray run folder's latest) as nanoGPT's ckpt.pt and/or a Hugging Face GPT-2 folder.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", nargs="+",
                        help="a ckpt.pt, a checkpoint folder, a run's out_dir, or a Ray run folder "
                        "(storage_path/run_name: its latest checkpoint)")  # fmt: skip
    parser.add_argument("--ckpt", metavar="FILE", help="write nanoGPT's single-file checkpoint here")
    parser.add_argument("--hf", metavar="DIR", help="write config.json and model.safetensors for GPT2LMHeadModel")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="write weights holding nan or inf too (a diverged run's; refused by default)")  # fmt: skip
    return parser.parse_args(argv)


def output_path(given: str | None, flag: str, folder: bool) -> Path | None:
    """Where --ckpt FILE (folder=False) or --hf DIR (folder=True) goes, checked before the checkpoint is
    read: not empty, not a folder for a file or a file for a folder, under a writable folder."""
    if given is None:
        return None
    if not given or is_uri(given):
        raise ExportError(f"{flag} {given!r}: give a local {'folder' if folder else 'file'} path")
    path = Path(given).expanduser()
    if folder and path.exists() and not path.is_dir():
        raise ExportError(f"{flag} {path} is a file, not a folder; choose another {flag}")
    if not folder and path.is_dir():
        raise ExportError(f"{flag} {path} is a folder; give a file path such as {path / checkpoint.CKPT_NAME}")
    for parent in path.parents:
        if not parent.exists():
            continue
        if not parent.is_dir():
            raise ExportError(f"{flag} {path}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ExportError(f"{flag} {path}: {parent} is not writable")
        break
    return path


WHAT_CHECKPOINT_IS = "a ckpt.pt, a checkpoint folder, a run's out_dir or a Ray run folder (storage_path/run_name)"
TORCH_FILE_STARTS = (b"PK", b"\x80")  # torch.save's zip archive, or its older plain pickle


def one_checkpoint(given: list[str]) -> str:
    """CHECKPOINT, one of it: a shell pattern such as RUN/checkpoint_* expands to every name it matches."""
    if len(given) == 1:
        return given[0]
    parents = {os.path.dirname(os.path.normpath(path)) for path in given}
    folder = f": a Ray run folder such as {parents.pop()} exports its latest checkpoint" if len(parents) == 1 else ""
    raise ExportError(f"give one CHECKPOINT, not {len(given)} (did a shell pattern expand?){folder}")


def say(line: str) -> None:
    print(line, flush=True)


def checkpoint_to_export(given: str) -> Path:
    """The local checkpoint CHECKPOINT names: a file or folder as it is, or a Ray run folder's latest
    checkpoint. One in object storage is downloaded (only the chosen checkpoint, for a run folder)."""
    if is_uri(given):
        return locate_checkpoint(given, say)
    path = Path(given).expanduser()
    if not path.exists():
        raise ExportError(f"no checkpoint at {path}")
    if path.is_file():
        check_torch_file(path)
        return path
    located = locate_checkpoint(given, say)
    if located == path and not ((path / checkpoint.CKPT_NAME).exists() or (path / checkpoint.PROGRESS_NAME).exists()):
        raise ExportError(f"{path} holds no checkpoint: give {WHAT_CHECKPOINT_IS}{where_instead(path)}")
    return located


def check_torch_file(path: Path) -> None:
    """A file that torch.save cannot have written is refused as what it is, not as a damaged checkpoint."""
    try:
        with open(path, "rb") as f:
            start = f.read(2)
    except OSError:
        return  # read_checkpoint says why
    if start and not start.startswith(TORCH_FILE_STARTS):
        raise ExportError(f"{path} is not a checkpoint (not a file torch.save wrote): give {WHAT_CHECKPOINT_IS}"
                          f"{where_instead(path.parent)}")  # fmt: skip


def where_instead(folder: Path) -> str:
    """A hint for a path that is not a checkpoint: the Ray run folder beside it or inside it, or the Ray run
    of an out_dir that holds no ckpt.pt (an FSDP run's)."""
    if any(p.is_dir() for p in folder.glob(f"{RAY_CHECKPOINT_PREFIX}*")):
        return f"; {folder} is a Ray run folder, which exports its latest checkpoint"
    runs = sorted({p.parent for p in folder.glob(f"*/{RAY_CHECKPOINT_PREFIX}*") if p.is_dir()})
    if runs:
        return f"; it holds Ray runs: give one of them, such as {runs[-1]}"
    record = read_record(str(folder)) if folder.is_dir() else None
    if record and isinstance(record.get("run_name"), str):
        return (f"; its run's checkpoints are in Ray's run folder, storage_path/{record['run_name']} "
                f"(by default ~/ray_results/{record['run_name']})")  # fmt: skip
    return ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def export() -> int:
        given = one_checkpoint(args.checkpoint)
        ckpt, hf = output_path(args.ckpt, "--ckpt", folder=False), output_path(args.hf, "--hf", folder=True)
        if not (ckpt or hf):
            raise ExportError("nothing to write: give --ckpt FILE and/or --hf DIR")
        if ckpt and hf and ckpt.resolve() in [hf.resolve(), *(hf.resolve() / name for name in HF_FILES)]:
            raise ExportError(f"--ckpt {ckpt} is --hf {hf} or one of its files: give them separate places")
        if hf:
            check_hf_installed()
        source = checkpoint_to_export(given)
        saved, where = checkpoint.read_checkpoint(source, mmap=True)  # --hf alone never reads the optimizer's state
        whole = whole_checkpoint(saved) if ckpt else None  # a sharded checkpoint's shards are read once
        model_state = clean_state_dict(whole["model"]) if whole else checkpoint.whole_model_state(saved)
        check_weights(model_state, where, args.allow_nonfinite)
        try:
            if ckpt:
                checkpoint.save_atomic(whole, ckpt)
                print(f"wrote {ckpt} (nanoGPT's layout) from {where}")
            if hf:
                export_hf(model_state, checkpoint.architecture(saved, where), hf)
                print(f"wrote {hf}/config.json and model.safetensors (GPT2LMHeadModel) from {where}")
        except OSError as e:  # a full disk (files.DiskFullError says so), or the place changed since the check
            raise ExportError(f"cannot write the export: {e.strerror or e}") from None
        return 0

    return run_cli(export)


if __name__ == "__main__":
    sys.exit(main())
