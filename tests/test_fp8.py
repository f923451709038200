"""fp8=True: which Linears become torchao float8 training linears, plain checkpoints, numerics close to
bf16 (CPU torch._scaled_mm), and the one-line refusals."""

import sys

import pytest
import torch

from raygpt.config.cli import read_config
from raygpt.config.schema import ConfigError, TrainConfig
from raygpt.core import fp8
from raygpt.core.model import GPT, GPTConfig
from raygpt.core.parallel import wrap_model

BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def tiny_gpt(n_embd: int = 32, n_head: int = 2, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=n_head, n_embd=n_embd, block_size=16, vocab_size=96, bias=True))


def test_only_the_blocks_linears_convert_and_the_head_stays_tied():
    from torchao.float8.float8_linear import Float8Linear

    model = tiny_gpt()
    parameters_before = dict(model.named_parameters())
    converted = fp8.float8_block_linears(model)
    assert converted == [f"transformer.h.{i}.{name}" for i in range(2) for name in BLOCK_LINEARS]
    swapped = [name for name, module in model.named_modules() if isinstance(module, Float8Linear)]
    assert swapped == converted
    assert type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight is model.transformer.wte.weight  # weight tying kept
    # The same Parameter objects: an optimizer or FSDP sees exactly the weights it saw before.
    assert all(p is parameters_before[name] for name, p in model.named_parameters())


def test_layers_whose_dims_are_not_multiples_of_16_stay_bf16():
    assert fp8.fp8_capable(torch.nn.Linear(32, 96), "transformer.h.0.attn.c_attn")
    assert not fp8.fp8_capable(torch.nn.Linear(32, 24), "transformer.h.0.attn.c_attn")
    assert not fp8.fp8_capable(torch.nn.Linear(32, 96), "lm_head")
    assert fp8.float8_block_linears(tiny_gpt(n_embd=24, n_head=3)) == []


def test_checkpoints_stay_plain():
    plain = tiny_gpt()
    converted = tiny_gpt()
    fp8.float8_block_linears(converted)
    state, reference = converted.state_dict(), plain.state_dict()
    assert list(state) == list(reference)  # nanoGPT's keys, in nanoGPT's order
    assert all(type(v) is torch.Tensor and torch.equal(v, reference[k]) for k, v in state.items())
    # A converted model's weights load into a plain GPT (export, nanoGPT) and back (resume).
    fresh = tiny_gpt(seed=1)
    fresh.load_state_dict(state)
    assert all(torch.equal(v, reference[k]) for k, v in fresh.state_dict().items())
    other = tiny_gpt(seed=1)
    fp8.float8_block_linears(other)
    other.load_state_dict(reference)
    assert all(torch.equal(v, reference[k]) for k, v in other.state_dict().items())


def loss_and_gradients(model: GPT, x, y):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(x, y)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_fp8_forward_and_backward_are_close_to_bf16():
    """CPU torch._scaled_mm runs the same float8 casts and matmuls: the loss and gradients of one batch
    stay close to bf16's (float8's ~2 significant digits against bf16's ~3)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 96, (8, 16), generator=generator)
    y = torch.randint(0, 96, (8, 16), generator=generator)
    bf16_loss, bf16_grads = loss_and_gradients(tiny_gpt(), x, y)
    model = tiny_gpt()
    fp8.float8_block_linears(model)
    fp8_loss, fp8_grads = loss_and_gradients(model, x, y)
    assert fp8_loss.item() == pytest.approx(bf16_loss.item(), rel=0.01)
    assert torch.nn.functional.cosine_similarity(fp8_grads, bf16_grads, dim=0) > 0.99


def refusal(function, *args) -> str:
    with pytest.raises(fp8.Fp8Error) as error:
        function(*args)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_refused_on_cpu_through_wrap_model():
    # A cuda config whose worker got no GPU (the launcher refuses this before Ray; a custom trainer might not).
    cfg = TrainConfig(fp8=True, dtype="bfloat16", compile=False)
    message = refusal(wrap_model, tiny_gpt(), cfg, 1, torch.device("cpu"), "bfloat16")
    assert message == "fp8=True trains on CUDA GPUs with FP8 tensor cores; this worker's device is cpu"


@pytest.mark.parametrize(
    "capability, dtype, expected",
    [
        ((8, 0), "bfloat16", "needs a GPU with FP8 tensor cores (compute capability 8.9+: L4, L40, H100, H200); "
         "Fake GPU is 8.0: drop --fp8=True"),
        ((9, 0), "float16", "dtype is float16: use --dtype=bfloat16"),
    ],
)  # fmt: skip
def test_refused_on_gpus_without_fp8_and_without_bfloat16(monkeypatch, capability, dtype, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    assert expected in refusal(fp8.check_fp8_device, torch.device("cuda", 0), dtype)


def test_missing_torchao_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao...` now raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    message = refusal(fp8.float8_block_linears, tiny_gpt())
    assert "pip install raygpt[fp8]" in message


def test_config_key():
    cfg, explicit = read_config(["--fp8=True", "--dtype=bfloat16"])  # how benchmarks pass it through
    assert cfg.fp8 is True and "fp8" in explicit
    assert TrainConfig().fp8 is False
    assert TrainConfig(fp8=True).dtype == "auto"  # auto is bfloat16 on every GPU with FP8 tensor cores
    for dtype in ("float16", "float32"):
        with pytest.raises(ConfigError, match=f"fp8=True computes the rest of the model in bfloat16; dtype {dtype}"):
            TrainConfig(fp8=True, dtype=dtype)


def test_cpu_runs_are_refused_before_any_worker_starts():
    from raygpt.driver.plan import plan_resources
    from raygpt.errors import LaunchError

    with pytest.raises(ConfigError, match="^fp8=True trains on CUDA GPUs with FP8 tensor cores; device is cpu"):
        TrainConfig(fp8=True, device="cpu", dtype="float32")
    cfg = TrainConfig(fp8=True, dtype="bfloat16", use_gpu=False, local_mode=True)
    with pytest.raises(LaunchError, match="fp8=True trains on GPUs with FP8 tensor cores; this run has CPU"):
        plan_resources(cfg)
