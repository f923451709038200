"""The GPT against Hugging Face's GPT-2, nanoGPT's parameter count, and its own invariants."""

import pytest
import torch

from raygpt.core.model import GPT, GPTConfig, KVCache, _peak_for_name, clean_state_dict, peak_flops

TINY = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16, dropout=0.0)


def hf_tiny_model(tmp_path, safe=True):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_positions=64,
        vocab_size=100,
        activation_function="gelu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    hf = transformers.GPT2LMHeadModel(config).eval()
    # Random biases and norms too, so a transpose or mapping mistake cannot hide behind zeros and ones.
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(tmp_path, safe_serialization=safe)
    return hf


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_logits_match_transformers_gpt2(tmp_path, safe):
    hf = hf_tiny_model(tmp_path, safe)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 100, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
        got, _ = ours(idx, targets=idx)  # with targets: logits at every position
    assert (got - expected).abs().max().item() <= 1e-4
    assert ours.config.vocab_size == 100 and ours.config.bias


@pytest.mark.parametrize("bias", [True, False])
def test_a_gpt2_folder_written_for_hf_reads_back_as_the_same_model(tmp_path, bias):
    """core/hf.py both ways: GPT2LMHeadModel's config.json and weights (Conv1D weights transposed, zero
    biases for bias=False), read back by from_pretrained into a GPT with the same logits."""
    import json

    from safetensors.torch import save_file

    from raygpt.core.hf import HF_FILES, hf_config, hf_weights

    torch.manual_seed(0)
    shape = {key: value for key, value in TINY.items() if key != "dropout"}
    ours = GPT(GPTConfig(**TINY, bias=bias)).eval()
    config_json, weights_file = (tmp_path / name for name in HF_FILES)
    config_json.write_text(json.dumps(hf_config({**shape, "bias": bias})))
    save_file(hf_weights(ours.state_dict(), {**shape, "bias": bias}), weights_file)
    back = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(idx, targets=idx)[0], ours(idx, targets=idx)[0])
    assert back.config.block_size == TINY["block_size"] and back.config.bias


def test_gpt2_124m_parameter_count():
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, bias=False))
    assert round(model.get_num_params() / 1e6, 2) == 123.59
    assert model.get_num_params(non_embedding=False) - model.get_num_params() == 1024 * 768


def test_shapes_tying_and_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    idx = torch.randint(0, 50, (2, 10))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 10, 50) and loss.ndim == 0
    logits, loss = model(idx)
    assert logits.shape == (2, 1, 50) and loss is None
    assert model.lm_head.weight is model.transformer.wte.weight
    c_proj = model.transformer.h[0].attn.c_proj.weight
    assert abs(c_proj.std().item() - 0.02 / (2 * 2) ** 0.5) < 0.004
    # ignore_index=-1: masked targets do not count
    targets = idx.clone()
    targets[:, 5:] = -1
    _, masked = model(idx, targets)
    _, first_half = model(idx[:, :5], idx[:, :5])
    assert torch.allclose(masked, first_half, atol=1e-6)


def test_an_uninitialized_model_is_tied_and_takes_a_checkpoint_exactly():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100, bias=True)
    torch.manual_seed(0)
    trained = GPT(config)
    empty = GPT.uninitialized(config, torch.device("cpu"))
    assert empty.transformer.wte.weight is empty.lm_head.weight  # tied again after to_empty
    assert not any(p.is_meta for p in empty.parameters())
    empty.load_state_dict(trained.state_dict())
    idx = torch.randint(0, 100, (2, 16))
    assert torch.equal(empty(idx, idx)[1], trained(idx, idx)[1])
    assert sum(p.numel() for p in empty.parameters()) == sum(p.numel() for p in trained.parameters())


META_PROBE = """
import sys, torch
from raygpt.core.checkpoint import check_resumable
from raygpt.core.model import GPT, GPTConfig
args = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16, bias=True)
meta = GPT.on_meta(GPTConfig(**args))
real = GPT(GPTConfig(**args))
assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
assert meta.lm_head.weight.is_meta and meta.transformer.wte.weight is meta.lm_head.weight
optimizer = {"state": {}, "param_groups": []}  # torch.optim's own classes import dynamo
check_resumable({"model": real.state_dict(), "optimizer": optimizer, "model_args": args}, "probe")
GPT.uninitialized(GPTConfig(**args), torch.device("cpu"))
print("torch._dynamo" in sys.modules)
"""


def test_a_meta_model_has_the_real_shapes_and_never_imports_dynamo():
    # Drawing random values into meta tensors imports torch._dynamo (a second or more). The launcher checks
    # a resume checkpoint's shapes on a meta model, and has no other use for dynamo.
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", META_PROBE], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stdout + done.stderr[-2000:]


def test_crop_block_size():
    model = GPT(GPTConfig(**TINY))
    model.crop_block_size(8)
    assert model.config.block_size == 8 and model.transformer.wpe.weight.shape == (8, 16)
    model(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(AssertionError):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.8, 5), (1.5, 1)])
def test_kv_cache_generates_the_same_tokens(temperature, top_k):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    prompt = torch.randint(0, 50, (2, 3))
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(42)
        outputs.append(model.generate(prompt, 30, temperature, top_k, use_cache=use_cache))  # runs past block_size
    assert outputs[0].shape == (2, 33)
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(outputs[0][:, :3], prompt)


def test_kv_cache_step_matches_full_forward():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    idx = torch.randint(0, 50, (1, 7))
    cache = KVCache(2)
    model(idx[:, :6], kv_cache=cache)
    step_logits, _ = model(idx[:, 6:], kv_cache=cache)
    full_logits, _ = model(idx)
    assert torch.allclose(step_logits, full_logits, atol=1e-5)


def test_nanogpt_checkpoint_keys_load():
    model = GPT(GPTConfig(**TINY))
    compiled_keys = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    fresh = GPT(GPTConfig(**TINY))
    fresh.load_state_dict(clean_state_dict(compiled_keys))
    assert torch.equal(fresh.transformer.wte.weight, model.transformer.wte.weight)
    assert set(clean_state_dict({"module._orig_mod.lm_head.weight": 1})) == {"lm_head.weight"}


def test_optimizer_groups_decay_only_matrices():
    model = GPT(GPTConfig(**{**TINY, "bias": True}))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", verbose=False)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == model.get_num_params(False)


def test_mfu_needs_a_known_gpu():
    model = GPT(GPTConfig(**TINY))
    assert peak_flops("cpu") is None
    assert model.estimate_mfu(1, 0.1, "cpu") is None
    assert _peak_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert _peak_for_name("NVIDIA H100 PCIe") == 756e12
    assert _peak_for_name("NVIDIA H200") == 989e12
    assert _peak_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert _peak_for_name("Some Future GPU") is None


def test_offline_gpt2_download_error_is_one_clear_line(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(RuntimeError) as error:
        GPT.from_pretrained("gpt2")
    message = str(error.value)
    assert "not cached" in message and "local directory" in message and "\n" not in message
