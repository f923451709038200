"""A dataset's tokenizer: its meta.json (or, read safely, nanoGPT's meta.pkl) and encode/decode."""

from __future__ import annotations

import functools
import json
import pickle
from pathlib import Path

EOT_TOKEN = 50256  # GPT-2's <|endoftext|>
GPT2_VOCAB_SIZE = 50257
# GPT-2's vocabulary padded up to a multiple of 64, nanoGPT's default for a model trained from scratch:
# the embedding and head matmuls are faster, and the extra rows are never a target.
PADDED_GPT2_VOCAB_SIZE = 50304


@functools.cache
def gpt2_encoding():
    import tiktoken

    return tiktoken.get_encoding("gpt2")


class _PlainDataUnpickler(pickle.Unpickler):
    """Loads only what pickle builds without importing anything: dicts, lists, strings, numbers."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: meta.pkl may hold only plain data")


def _meta_from_pkl(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            raw = _PlainDataUnpickler(f).load()
    except Exception as e:  # noqa: BLE001 - any failure of an untrusted file gets the same one-line answer
        raise ValueError(
            f"{path}: not a plain nanoGPT meta.pkl ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    itos, vocab_size = (
        raw.get("itos") if isinstance(raw, dict) else None,
        raw.get("vocab_size") if isinstance(raw, dict) else None,
    )
    if not (
        isinstance(vocab_size, int)
        and isinstance(itos, dict)
        and all(isinstance(i, int) and isinstance(s, str) for i, s in itos.items())
        and sorted(itos) == list(range(vocab_size))
    ):
        raise ValueError(f"{path}: expected a dict with vocab_size and an itos table of {vocab_size} characters")
    return {"vocab_size": vocab_size, "tokenizer": "char", "chars": [itos[i] for i in range(vocab_size)]}


def load_meta(dataset_dir: str | Path) -> dict | None:
    """The dataset's vocabulary: {'vocab_size', 'tokenizer': 'char'|'gpt2', 'chars' (char only)}, or None."""
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / "meta.json"
    if not path.exists():
        return _meta_from_pkl(dataset_dir / "meta.pkl") if (dataset_dir / "meta.pkl").exists() else None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int) or meta["vocab_size"] < 1:
        raise ValueError(f"{path} must be a JSON object with a positive integer vocab_size")
    if meta.get("tokenizer") not in ("char", "gpt2"):
        raise ValueError(f"{path}: tokenizer must be 'char' or 'gpt2', got {meta.get('tokenizer')!r}")
    if meta["tokenizer"] == "char":
        chars = meta.get("chars")
        if not (
            isinstance(chars, list)
            and len(chars) == meta["vocab_size"]
            and all(isinstance(c, str) and len(c) == 1 for c in chars)
        ):
            raise ValueError(f"{path}: 'chars' must list the {meta['vocab_size']} characters of the vocabulary")
    return meta


class Tokenizer:
    """encode/decode for a character vocabulary or GPT-2 BPE."""

    def __init__(self, chars: list[str] | None = None):
        self.chars = chars
        if chars is not None:
            self.name, self.vocab_size = "char", len(chars)
            self.stoi = {c: i for i, c in enumerate(chars)}
        else:
            self.name, self.vocab_size = "gpt2", gpt2_encoding().n_vocab

    @classmethod
    def from_meta(cls, meta: dict | None) -> Tokenizer:
        return cls(meta["chars"]) if meta and meta.get("tokenizer") == "char" else cls(None)

    def encode(self, text: str) -> list[int]:
        if self.chars is not None:
            unknown = sorted(set(text) - self.stoi.keys())
            if unknown:
                raise ValueError(f"characters not in the vocabulary: {''.join(unknown)!r}")
            return [self.stoi[c] for c in text]
        # Prompts may mark document boundaries with <|endoftext|>, as in nanoGPT's sample.py.
        return gpt2_encoding().encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids: list[int]) -> str:
        if self.chars is not None:
            return "".join(self.chars[i] for i in ids)
        return gpt2_encoding().decode(ids)
