"""GPT-2 as in nanoGPT: same modules, same state_dict key names, same initialisation. Pure PyTorch.

Layout: token + position embeddings -> n_layer pre-LayerNorm blocks (causal self-attention, MLP)
-> final LayerNorm -> lm_head, whose weight is the token embedding's (weight tying).
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

from raygpt.core import hf
from raygpt.core.tokenizer import PADDED_GPT2_VOCAB_SIZE


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = PADDED_GPT2_VOCAB_SIZE
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2; False is a bit better and faster


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nn.LayerNorm cannot drop only the bias)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.flash = hasattr(F, "scaled_dot_product_attention")
        if not self.flash:
            mask = torch.tril(torch.ones(config.block_size, config.block_size)).view(
                1, 1, config.block_size, config.block_size
            )
            self.register_buffer("bias", mask, persistent=False)

    def forward(self, x, kv_cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        causal = True
        if kv_cache is not None:
            k, v = kv_cache.append(layer, k, v)
            # A single new token attends to everything cached; a prompt (prefill) is causal as usual.
            causal = T > 1
        if self.flash:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
            )
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            if causal:
                S = k.size(-2)
                att = att.masked_fill(self.bias[:, :, S - T : S, :S] == 0, float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()  # exact GELU, as nanoGPT (GPT-2 used the tanh approximation)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, layer: int = 0):
        x = x + self.attn(self.ln_1(x), kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys and values of the tokens seen so far, one pair per layer, for incremental generation."""

    def __init__(self, n_layer: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].size(-2)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=-2)
            v = torch.cat([self.values[layer], v], dim=-2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class SkipRandomInit(torch.overrides.TorchFunctionMode):
    """Within it, the random fills that module constructors and GPT's init use do nothing."""

    FILLS = frozenset({nn.init.normal_, nn.init.uniform_, nn.init.kaiming_uniform_, nn.init.trunc_normal_,
                       torch.Tensor.normal_, torch.Tensor.uniform_})  # fmt: skip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FILLS:  # the tensor to fill, as given: nn.init's by keyword
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the output projection reuses the token embedding.
        self.transformer.wte.weight = self.lm_head.weight
        self.recompute_layers: frozenset[int] = frozenset()  # activation checkpointing (parallel.py sets it)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that feed the residual stream.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @classmethod
    def on_meta(cls, config: GPTConfig) -> GPT:
        """A GPT on the meta device: shapes, no memory, no init (a meta tensor has no values to draw, and
        drawing them imports torch._dynamo: a second or more in the launcher, which has no other use for it)."""
        with torch.device("meta"), SkipRandomInit():
            return cls(config)

    @classmethod
    def uninitialized(cls, config: GPTConfig, device: torch.device) -> GPT:
        """A GPT whose weights are allocated on `device` but hold whatever memory held: for a checkpoint to
        overwrite. Skips the random init, which takes the CPU about a minute and a half at 6.7B."""
        model = cls.on_meta(config)
        if any(True for _ in model.buffers()):  # none with PyTorch 2's fused attention; else keep them right
            return cls(config).to(device)
        model.to_empty(device=device)
        model.transformer.wte.weight = model.lm_head.weight  # to_empty gave the two modules separate tensors
        return model

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding leaves out the position embeddings (wte counts, as lm_head)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None):
        x = self.hidden_states(idx, kv_cache)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        else:
            # Inference needs only the last position: skip the vocab projection of the others.
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss

    def hidden_states(self, idx, kv_cache: KVCache | None = None):
        """The last block's output, normalized, at every position: what lm_head turns into logits. The
        evals call it directly to take the logits of the positions they score only."""
        B, T = idx.size()
        start = kv_cache.length if kv_cache is not None else 0
        assert start + T <= self.config.block_size, (
            f"sequence of {start + T} exceeds block_size {self.config.block_size}"
        )
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for layer, block in enumerate(self.transformer.h):
            if layer in self.recompute_layers and torch.is_grad_enabled():
                # Activation checkpointing: keep only the block's input; backward recomputes the rest.
                x = torch.utils.checkpoint.checkpoint(block, x, kv_cache, layer, use_reentrant=False)
            else:
                x = block(x, kv_cache, layer)
        return self.transformer.ln_f(x)

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context length (e.g. GPT-2's 1024 to a smaller block_size for fine-tuning)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        for block in self.transformer.h:
            if hasattr(block.attn, "bias"):
                block.attn.bias = block.attn.bias[:, :, :block_size, :block_size]

    @classmethod
    def from_pretrained(cls, model_type: str, override_args: dict | None = None) -> GPT:
        """GPT-2 weights from the Hugging Face hub ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl') or a
        local directory with config.json and model.safetensors / pytorch_model.bin. No transformers needed."""
        override_args = override_args or {}
        assert all(key == "dropout" for key in override_args), "only dropout can be overridden"
        directory = Path(model_type).expanduser()
        if not directory.is_dir():
            directory = hf.download_gpt2(model_type)
        model = cls(GPTConfig(**hf.gpt2_model_args(directory), dropout=override_args.get("dropout", 0.0)))
        hf.load_gpt2_weights(model, directory)
        return model

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, verbose=True):
        """AdamW with weight decay on matrices and embeddings (dim >= 2), none on biases and norms."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if verbose:
            print(f"num decayed parameter tensors: {len(decay)}, with {sum(p.numel() for p in decay):,} parameters")
            print(
                f"num non-decayed parameter tensors: {len(no_decay)}, with "
                f"{sum(p.numel() for p in no_decay):,} parameters"
            )
        use_fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if use_fused else {}))
        if verbose:
            print(f"using fused AdamW: {use_fused}")
        return optimizer

    def flops_per_token(self) -> float:
        """nanoGPT's estimate (PaLM appendix B): 6N for the matmuls plus 12*L*H*Q*T for attention."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * self.get_num_params() + 12 * L * H * Q * T

    def estimate_mfu(self, fwdbwd_per_iter: int, dt: float, device=None) -> float | None:
        """Model FLOPs utilisation against the real GPU's dense bf16 peak; None where that is unknown."""
        peak = peak_flops(device)
        if peak is None or dt <= 0:
            return None
        flops_per_iter = self.flops_per_token() * self.config.block_size * fwdbwd_per_iter
        return flops_per_iter / dt / peak

    @torch.no_grad()
    def generate(
        self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, use_cache: bool = True
    ):
        """Sample max_new_tokens tokens after idx (B, T). With use_cache the keys and values of earlier
        tokens are kept instead of recomputed, while the sequence fits in block_size; past that, every
        step recomputes the last block_size tokens (their positions shift), as the cache-free path does."""
        kv_cache = None
        for _ in range(max_new_tokens):
            if use_cache and idx.size(1) <= self.config.block_size:
                if kv_cache is None:
                    kv_cache = KVCache(self.config.n_layer)
                    logits, _ = self(idx, kv_cache=kv_cache)
                else:
                    logits, _ = self(idx[:, -1:], kv_cache=kv_cache)
            else:
                logits, _ = self(idx[:, -self.config.block_size :])
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, matched against the device name.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM (H100 80GB HBM3)
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),  # AWS's A10G: 70 TFLOPS dense bf16 per NVIDIA's A10G figures
    ("A10", 125e12),
    ("RTX 4090", 165.2e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16 tensor cores (V100 has no bf16)
)


@functools.cache
def _peak_for_name(name: str) -> float | None:
    for key, peak in PEAK_BF16_FLOPS:
        if key in name:
            return peak
    return None


def peak_flops(device=None) -> float | None:
    """The dense bf16 peak of `device` (a CUDA GPU) or None for CPUs and GPUs not in the table."""
    if device is not None and torch.device(device).type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    return _peak_for_name(torch.cuda.get_device_name(device))


def clean_state_dict(state: dict) -> dict:
    """Strip the prefixes torch.compile (`_orig_mod.`) and DDP (`module.`) add to parameter names."""
    cleaned = {}
    for key, value in state.items():
        while key.startswith(("_orig_mod.", "module.")):
            key = key.split(".", 1)[1]
        cleaned[key] = value
    return cleaned
