"""FP8 matmuls for training (fp8=True): the transformer blocks' Linear layers become torchao's float8
training linears, which cast their inputs, weights and gradients to float8 with one dynamic scale per
tensor (tensorwise) and multiply on the GPU's FP8 tensor cores.

Only the blocks' Linears change (attention c_attn/c_proj, MLP c_fc/c_proj). lm_head stays a bf16 Linear:
it shares its weight with wte (weight tying), and the logits feed the loss directly. A converted layer
keeps the same Parameter objects, so state_dicts keep nanoGPT's keys and values and checkpoints stay
plain: ckpt.pt loads into nanoGPT, resume and export work, and a run may switch fp8 on or off.

Under FSDP the weights are still all-gathered in bf16 (torchao's float8 all-gather is off): it would
make each weight a tensor subclass and want a scale refresh after every optimizer step.
"""

from __future__ import annotations

import torch

from raygpt.errors import RaygptError

BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
FP8_COMPUTE_CAPABILITY = (8, 9)  # Ada (L4, L40) and Hopper (H100, H200) and newer have FP8 tensor cores
FP8_DIM_MULTIPLE = 16  # FP8 matmuls need both dimensions of the weight to be multiples of 16


class Fp8Error(RaygptError, RuntimeError):
    """fp8=True where it cannot run; the message is one line."""


def check_fp8_device(device: torch.device, dtype: str) -> None:
    """Refuse, at worker start, a device or dtype that FP8 training cannot use."""
    if device.type != "cuda":
        raise Fp8Error(f"fp8=True trains on CUDA GPUs with FP8 tensor cores; this worker's device is {device.type}")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_COMPUTE_CAPABILITY:
        raise Fp8Error(
            f"fp8=True needs a GPU with FP8 tensor cores (compute capability 8.9+: L4, L40, H100, H200); "
            f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}: drop --fp8=True"
        )
    if dtype != "bfloat16":
        raise Fp8Error(f"fp8=True computes the rest of the model in bfloat16; dtype is {dtype}: use --dtype=bfloat16")


def fp8_capable(module: torch.nn.Module, name: str) -> bool:
    """A block's Linear whose weight dimensions FP8 matmuls accept."""
    return (
        isinstance(module, torch.nn.Linear)
        and name.startswith("transformer.h.")
        and name.endswith(BLOCK_LINEARS)
        and module.in_features % FP8_DIM_MULTIPLE == 0
        and module.out_features % FP8_DIM_MULTIPLE == 0
    )


def float8_block_linears(model: torch.nn.Module) -> list[str]:
    """Swap the blocks' FP8-capable Linears for torchao float8 training linears (tensorwise scaling), in
    place, on any device. Returns the names of the swapped layers."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise Fp8Error("fp8=True needs torchao: pip install raygpt[fp8] (or pip install torchao)") from None
    chosen = [name for name, module in model.named_modules() if fp8_capable(module, name)]
    convert_to_float8_training(model, module_filter_fn=fp8_capable, config=Float8LinearConfig())
    return chosen


def convert_linears(model: torch.nn.Module, device: torch.device, dtype: str) -> list[str]:
    """fp8=True: check the device and dtype, then swap the blocks' Linears (before compile and before DDP
    or FSDP wrap the model). Returns the names of the swapped layers."""
    check_fp8_device(device, dtype)
    return float8_block_linears(model)
