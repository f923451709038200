"""`python -m raygpt.export CHECKPOINT [--ckpt FILE] [--hf DIR]`: any checkpoint as nanoGPT's ckpt.pt
or a Hugging Face GPT-2 folder.

CHECKPOINT is a ckpt.pt, a Ray checkpoint folder (whole or sharded by FSDP) or a run's out_dir. A
sharded checkpoint is gathered on the CPU without any process group.

    python -m raygpt.export ~/ray_results/run/checkpoint_2026-... --ckpt out-run/ckpt.pt
    python -m raygpt.export out-shakespeare-char --hf gpt2-shakespeare   # GPT2LMHeadModel.from_pretrained
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from raygpt import checkpoint
from raygpt.errors import RaygptError, run_cli
from raygpt.files import write_atomic, write_text_atomic
from raygpt.model import GPT, GPTConfig
from raygpt.storage import is_uri
from raygpt.tokenizer import EOT_TOKEN

# Hugging Face's GPT-2 keeps these as Conv1D weights: the transpose of nn.Linear's.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


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


def hf_config(model_args: dict) -> dict:
    """GPT2Config's fields for this model. nanoGPT's GELU is the exact one ('gelu'), not GPT-2's tanh
    approximation ('gelu_new'), so the exported model computes the same logits."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": model_args["vocab_size"],
        "n_positions": model_args["block_size"],
        "n_ctx": model_args["block_size"],
        "n_embd": model_args["n_embd"],
        "n_layer": model_args["n_layer"],
        "n_head": model_args["n_head"],
        "activation_function": "gelu",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": True,
        # GPT-2's <|endoftext|>, where the vocabulary is GPT-2's; a character vocabulary has none.
        "bos_token_id": EOT_TOKEN if model_args["vocab_size"] > EOT_TOKEN else None,
        "eos_token_id": EOT_TOKEN if model_args["vocab_size"] > EOT_TOKEN else None,
    }


def hf_weights(model_state: dict, model_args: dict) -> dict:
    """GPT2LMHeadModel's weights: Conv1D weights transposed, zero biases where the model has none
    (bias=False), lm_head left to the tie with wte."""
    n_embd = model_args["n_embd"]
    zeros_for = {"ln_1": n_embd, "ln_2": n_embd, "ln_f": n_embd, "c_attn": 3 * n_embd, "attn.c_proj": n_embd,
                 "c_fc": 4 * n_embd, "mlp.c_proj": n_embd}  # fmt: skip
    weights = {}
    for key, value in model_state.items():
        if key == "lm_head.weight" or key.endswith(".attn.bias"):
            continue  # tied to wte; the causal-mask buffer of nanoGPT's slow attention path
        value = value.t() if key.endswith(CONV1D_WEIGHTS) else value
        weights[key] = value.detach().to(torch.float32).contiguous().clone()
        bias_key = key.removesuffix(".weight") + ".bias"
        if key.endswith(".weight") and bias_key not in model_state and "wte" not in key and "wpe" not in key:
            size = next(size for part, size in zeros_for.items() if f"{part}.weight" in key)
            weights[bias_key] = torch.zeros(size)
    return weights


def export_hf(saved: dict, directory: Path) -> None:
    try:
        from safetensors.torch import save
    except ImportError:
        raise ExportError("--hf writes safetensors: pip install safetensors") from None
    model_args = checkpoint.architecture(saved, "checkpoint")
    weights = hf_weights(checkpoint.whole_model_state(saved), model_args)
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(directory / "config.json", json.dumps(hf_config(model_args), indent=2) + "\n")
    data = save(weights, metadata={"format": "pt"})
    write_atomic(directory / "model.safetensors", lambda f: f.write(data))


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(
        prog="python -m raygpt.export",
        usage="%(prog)s CHECKPOINT [--ckpt FILE] [--hf DIR]",
        description="Write any raygpt checkpoint (a ckpt.pt, a Ray checkpoint folder, sharded or not, or a "
        "run's out_dir) as nanoGPT's ckpt.pt and/or a Hugging Face GPT-2 folder.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="what to export")
    parser.add_argument("--ckpt", metavar="FILE", help="write nanoGPT's single-file checkpoint here")
    parser.add_argument("--hf", metavar="DIR", help="write config.json and model.safetensors for GPT2LMHeadModel")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def export() -> int:
        if not (args.ckpt or args.hf):
            raise ExportError("nothing to write: give --ckpt FILE and/or --hf DIR")
        source = checkpoint.download(args.checkpoint) if is_uri(args.checkpoint) else Path(args.checkpoint).expanduser()
        if not source.exists():
            raise ExportError(f"no checkpoint at {source}")
        saved, where = checkpoint.read_checkpoint(source, mmap=True)  # --hf alone never reads the optimizer's state
        if args.ckpt:
            checkpoint.save_atomic(whole_checkpoint(saved), Path(args.ckpt).expanduser())
            print(f"wrote {args.ckpt} (nanoGPT's layout) from {where}")
        if args.hf:
            export_hf(saved, Path(args.hf).expanduser())
            print(f"wrote {args.hf}/config.json and model.safetensors (GPT2LMHeadModel) from {where}")
        return 0

    return run_cli(export)


if __name__ == "__main__":
    sys.exit(main())
