"""`python -m raygpt.export CHECKPOINT [--ckpt FILE] [--hf DIR]`: any checkpoint as nanoGPT's ckpt.pt
or a Hugging Face GPT-2 folder.

CHECKPOINT is a ckpt.pt, a Ray checkpoint folder (whole or sharded by FSDP) or a run's out_dir. A
sharded checkpoint is gathered on the CPU without any process group. Weights holding nan or inf are
refused, as resume and sample refuse them, unless --allow-nonfinite.

    python -m raygpt.export ~/ray_results/run/checkpoint_2026-... --ckpt out-run/ckpt.pt
    python -m raygpt.export out-shakespeare-char --hf gpt2-shakespeare   # GPT2LMHeadModel.from_pretrained
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


def export_hf(model_state: dict, model_args: dict, directory: Path) -> None:
    try:
        from safetensors.torch import save
    except ImportError:
        raise ExportError("--hf writes safetensors: pip install safetensors") from None
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
        description="Write any raygpt checkpoint (a ckpt.pt, a Ray checkpoint folder, sharded or not, or a "
        "run's out_dir) as nanoGPT's ckpt.pt and/or a Hugging Face GPT-2 folder.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="what to export")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def export() -> int:
        ckpt, hf = output_path(args.ckpt, "--ckpt", folder=False), output_path(args.hf, "--hf", folder=True)
        if not (ckpt or hf):
            raise ExportError("nothing to write: give --ckpt FILE and/or --hf DIR")
        if ckpt and hf and ckpt.resolve() in [hf.resolve(), *(hf.resolve() / name for name in HF_FILES)]:
            raise ExportError(f"--ckpt {ckpt} is --hf {hf} or one of its files: give them separate places")
        source = checkpoint.download(args.checkpoint) if is_uri(args.checkpoint) else Path(args.checkpoint).expanduser()
        if not source.exists():
            raise ExportError(f"no checkpoint at {source}")
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
