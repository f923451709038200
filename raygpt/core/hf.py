"""GPT-2's Hugging Face side: the hub's repos (availability, download), a local GPT-2 folder checked, its
weights read into a GPT, and a GPT written back as GPT2LMHeadModel's config and weights. No transformers
needed: config.json and safetensors (or pytorch_model.bin) are all there is to it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from raygpt.config.schema import (
    GPT2_CONTEXT,
    GPT2_MODELS,
    INT64_LIMIT,
    ConfigError,
    read_small_file,
    shown,
    unknown_init_from,
)
from raygpt.core.tokenizer import EOT_TOKEN
from raygpt.errors import one_line

HF_REPOS = {name: f"openai-community/{name}" for name in GPT2_MODELS}
HF_FILES = ("config.json", "model.safetensors")
# Hugging Face's GPT-2 keeps these as Conv1D weights: the transpose of nn.Linear's.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# ---- GPT-2 in: the hub, a local folder, its weights ------------------------------------------------


def download_gpt2(model_type: str) -> Path:
    """The local folder of a GPT-2 checkpoint from the HF hub (downloaded once, then cached)."""
    if model_type not in HF_REPOS:
        raise ValueError(f"unknown model {model_type!r}: use one of {', '.join(HF_REPOS)} or a local directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise RuntimeError("GPT-2 weights need huggingface_hub: pip install 'raygpt[hf]'") from None
    try:
        return Path(snapshot_download(HF_REPOS[model_type], allow_patterns=list(HF_FILES)))
    except Exception as e:  # noqa: BLE001 - offline, hub down, no cache: all get the same advice
        raise RuntimeError(gpt2_unavailable(model_type, e)) from None


def check_gpt2_available(model_type: str, timeout_s: float = 5.0) -> None:
    """Before any worker starts: GPT-2's weights are in this machine's HF cache, or the hub answers (the
    workers download them). Raises RuntimeError with download_gpt2's advice otherwise."""
    try:
        from huggingface_hub import HfApi, try_to_load_from_cache
    except ImportError:
        raise RuntimeError("GPT-2 weights need huggingface_hub: pip install 'raygpt[hf]'") from None
    repo = HF_REPOS[model_type]
    if all(isinstance(try_to_load_from_cache(repo, name), str) for name in HF_FILES):
        return
    try:
        HfApi().model_info(repo, timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - offline (HF_HUB_OFFLINE too), no DNS, hub down
        raise RuntimeError(gpt2_unavailable(model_type, e)) from None


def gpt2_unavailable(model_type: str, error: Exception) -> str:
    return (
        f"cannot get {model_type} weights ({type(error).__name__}): they are not cached and the hub is "
        f"unreachable; pass a local directory with config.json and model.safetensors (init_from=/path/to/{model_type})"
    )


def check_gpt2_folder(init_from: str, block_size: int) -> str:
    """Before Ray starts: an init_from that is none of INIT_CHOICES names a GPT-2 checkpoint folder whose
    context holds block_size. Returns the folder as an absolute path: each worker runs in a folder of its
    own, where a relative one would name nothing."""
    directory = Path(init_from).expanduser()
    if not (init_from.strip() and directory.is_dir()):  # '' would be '.'
        raise unknown_init_from(init_from)
    context = gpt2_model_args(directory)["block_size"]
    if block_size > context:
        raise ConfigError(
            f"the GPT-2 weights in {init_from} have a {context}-token context; block_size {block_size} is larger"
        )
    return str(directory.resolve())


def gpt2_model_args(directory: Path) -> dict:
    """GPTConfig's shape for the GPT-2 checkpoint in `directory`, after checking that it holds what
    load_gpt2_weights reads: config.json (n_layer, n_head, n_embd, vocab_size, n_positions) and
    model.safetensors or pytorch_model.bin."""
    where = f"init_from {directory} is not a GPT-2 checkpoint folder"
    try:
        config = json.loads(read_small_file(directory / "config.json", "config file"))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{where}: config.json is not valid JSON ({one_line(str(e))})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: config.json is not a JSON object")
    for name in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions"):
        value = config.get(name, GPT2_CONTEXT if name == "n_positions" else None)
        if not (isinstance(value, int) and not isinstance(value, bool) and 0 < value < INT64_LIMIT):
            raise ConfigError(f"{where}: config.json needs a positive integer {name}, got {shown(value)}")
    if config["n_embd"] % config["n_head"]:
        raise ConfigError(f"{where}: n_embd {config['n_embd']} is not divisible by n_head {config['n_head']}")
    if not any((directory / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        raise ConfigError(f"{where}: it has neither model.safetensors nor pytorch_model.bin")
    shape = {name: config[name] for name in ("n_layer", "n_head", "n_embd", "vocab_size")}
    return {**shape, "block_size": config.get("n_positions", GPT2_CONTEXT), "bias": True}  # GPT-2 has biases


def read_hf_weights(directory: Path) -> dict:
    if (directory / "model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(str(directory / "model.safetensors"))
    if (directory / "pytorch_model.bin").exists():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory} has neither model.safetensors nor pytorch_model.bin")


def load_gpt2_weights(model: torch.nn.Module, directory: Path) -> None:
    """Copy the HF GPT-2 weights in `directory` into `model`, a GPT of gpt2_model_args(directory)."""
    hf_state = read_hf_weights(directory)
    state = model.state_dict()
    for key, value in hf_state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # HF's causal-mask buffers, not weights
        key = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
        if key not in state:
            raise ValueError(f"unexpected weight {key} in {directory}")
        if key.endswith(CONV1D_WEIGHTS):
            value = value.t()
        if value.shape != state[key].shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)} in {directory}, expected {tuple(state[key].shape)}")
        with torch.no_grad():
            state[key].copy_(value)
    if "lm_head.weight" not in hf_state:  # tied: lm_head is wte
        state["lm_head.weight"].copy_(state["transformer.wte.weight"])


# ---- GPT-2 out: GPT2LMHeadModel's config.json and weights -------------------------------------------


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
