"""A dataset's tokenizer: its meta.json (or, read safely, nanoGPT's meta.pkl) and encode/decode."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import pickle
import tempfile
from pathlib import Path

from raygpt.errors import RaygptError, one_line
from raygpt.storage.files import FileTooLargeError, NotARegularFileError, read_regular_file

EOT_TOKEN = 50256  # GPT-2's <|endoftext|>
GPT2_VOCAB_SIZE = 50257
# GPT-2's vocabulary padded up to a multiple of 64, nanoGPT's default for a model trained from scratch:
# the embedding and head matmuls are faster, and the extra rows are never a target.
PADDED_GPT2_VOCAB_SIZE = 50304
# Token files hold uint16 ids (GPT-2's 50257 fit); meta.json says so, so that other widths are refused.
TOKEN_DTYPE = "uint16"
MAX_VOCAB_SIZE = 1 << 16
MAX_META_BYTES = 16 << 20  # a character vocabulary of 65,536 entries is under 1 MiB of JSON


class MetaError(RaygptError, ValueError):
    """A meta.json or meta.pkl that cannot describe the dataset's tokens; the message is one line."""


class TokenizerUnavailable(RaygptError):
    """GPT-2 BPE cannot be loaded here (tiktoken's files neither cached nor downloadable); one line."""


@functools.cache
def gpt2_encoding():
    """tiktoken's GPT-2 BPE: the one place raygpt loads it (prepare, sample and the rest), so a machine
    without the files and without internet gets one line saying what to do, not a download's traceback."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except (OSError, ValueError) as e:  # requests' errors are OSErrors; a checksum mismatch is a ValueError
        raise TokenizerUnavailable(bpe_files_advice(e)) from None


def bpe_files_advice(error: Exception) -> str:
    """Why tiktoken could not load GPT-2 BPE, and the two ways out: a connection, or a cache that holds it.
    tiktoken caches a download under the sha1 of its URL in TIKTOKEN_CACHE_DIR, else $TMPDIR/data-gym-cache."""
    reason = type(error).__name__ + (f": {error.strerror}" if getattr(error, "strerror", None) else "")
    if isinstance(error, ValueError):
        reason = one_line(str(error)) or reason
    default_cache = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    given = os.environ.get("TIKTOKEN_CACHE_DIR")
    where = f"TIKTOKEN_CACHE_DIR {given} does not hold them" if given else "TIKTOKEN_CACHE_DIR is not set"
    return (
        f"GPT-2 BPE needs tiktoken's gpt2 files, which could not be downloaded ({reason}) and {where}: "
        "connect to the internet once, or set TIKTOKEN_CACHE_DIR to a copy of the tiktoken cache of a machine "
        f"that has loaded GPT-2 BPE (its TIKTOKEN_CACHE_DIR, by default {default_cache})"
    )


class _PlainDataUnpickler(pickle.Unpickler):
    """Loads only what pickle builds without importing anything: dicts, lists, strings, numbers."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: meta.pkl may hold only plain data")


def _read_meta_file(path: Path) -> bytes | None:
    """The bytes of meta.json or meta.pkl, None when there is none; a folder, a symlink loop, a device or
    an absurdly large file is a MetaError."""
    try:
        return read_regular_file(path, MAX_META_BYTES)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise MetaError(f"{path} is a folder, not a file") from None
    except NotARegularFileError:
        raise MetaError(f"{path} is not a regular file") from None
    except FileTooLargeError:
        raise MetaError(f"{path} is larger than {MAX_META_BYTES >> 20} MiB: not a tokenizer description") from None
    except OSError as e:
        raise MetaError(f"cannot read {path}: {e.strerror}") from None


def _meta_from_pkl(path: Path, data: bytes) -> dict:
    try:
        raw = _PlainDataUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # noqa: BLE001 - any failure of an untrusted file gets the same one-line answer
        raise MetaError(f"{path}: not a plain nanoGPT meta.pkl ({one_line(str(e)) or type(e).__name__})") from None
    itos, vocab_size = (
        raw.get("itos") if isinstance(raw, dict) else None,
        raw.get("vocab_size") if isinstance(raw, dict) else None,
    )
    if not (
        _is_vocab_size(vocab_size)
        and isinstance(itos, dict)
        and all(isinstance(i, int) and isinstance(s, str) for i, s in itos.items())
        and sorted(itos) == list(range(vocab_size))
    ):
        raise MetaError(
            f"{path}: expected a dict with vocab_size (1 to {MAX_VOCAB_SIZE:,}) and an itos table of as many characters"
        )
    return {"vocab_size": vocab_size, "tokenizer": "char", "chars": [itos[i] for i in range(vocab_size)]}


def _is_vocab_size(value) -> bool:
    """Token ids are uint16, so a vocabulary has 1 to 65,536 entries."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_VOCAB_SIZE


def _read_meta(dataset_dir: Path) -> dict | None:
    """meta.json checked whole (or meta.pkl, as meta.json would say it), or None when there is neither."""
    path = dataset_dir / "meta.json"
    data = _read_meta_file(path)
    if data is None:
        pkl = dataset_dir / "meta.pkl"
        data = _read_meta_file(pkl)
        return None if data is None else _meta_from_pkl(pkl, data)
    return meta_from_json(data, str(path), dataset_dir.name)


def meta_from_json(data: bytes, path: str, dataset_name: str) -> dict:
    """A meta.json's bytes checked whole; `path` (a file or a URI) and `dataset_name` are for messages."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, or nested past the parser's depth
        raise MetaError(f"{path} is not valid JSON: {one_line(str(e)) or type(e).__name__}") from None
    if not isinstance(meta, dict) or not _is_vocab_size(meta.get("vocab_size")):
        raise MetaError(
            f"{path} must be a JSON object with a positive integer vocab_size of at most {MAX_VOCAB_SIZE:,} "
            f"(token ids are {TOKEN_DTYPE})"
        )
    if meta.get("tokenizer") not in ("char", "gpt2"):
        raise MetaError(f"{path}: tokenizer must be 'char' or 'gpt2', got {str(meta.get('tokenizer'))[:40]!r}")
    if meta.get("dtype", TOKEN_DTYPE) != TOKEN_DTYPE:
        raise MetaError(
            f"{path} says the tokens are {str(meta['dtype'])[:40]!r}, but raygpt reads {TOKEN_DTYPE} token files: "
            f"prepare the dataset again with `python -m raygpt.prepare {dataset_name}`"
        )
    if meta["tokenizer"] == "char":
        chars = meta.get("chars")
        if not (
            isinstance(chars, list)
            and len(chars) == meta["vocab_size"]
            and all(isinstance(c, str) and len(c) == 1 for c in chars)
            and len(set(chars)) == len(chars)
        ):
            raise MetaError(
                f"{path}: 'chars' must list the {meta['vocab_size']} characters of the vocabulary, each once"
            )
    return meta


def vocabulary(meta: dict) -> dict:
    """The part of a checked meta.json that describes the tokens: what load_meta returns."""
    return {key: meta[key] for key in ("vocab_size", "tokenizer", "chars") if key in meta}


def vocabulary_digest(meta: dict | None) -> str | None:
    """A sha256 of what the token ids mean (the tokenizer, vocab_size and a character table): two datasets
    prepared from different texts with vocabularies of the same size differ here. None without a meta."""
    if meta is None:
        return None
    return hashlib.sha256(json.dumps(vocabulary(meta), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def scratch_vocab_size(meta: dict | None) -> int:
    """The vocabulary a model trained from scratch gets: its dataset's, or with no meta.json (GPT-2 BPE
    tokens) nanoGPT's padded GPT-2 vocabulary."""
    return meta["vocab_size"] if meta else PADDED_GPT2_VOCAB_SIZE


def read_meta(dataset_dir: str | Path) -> dict | None:
    """The dataset's meta.json checked whole (meta.pkl's vocabulary where there is only that), or None:
    the vocabulary and what raygpt.prepare records beside it (dtype, each token file's size and sha256)."""
    return _read_meta(Path(dataset_dir))


def load_meta(dataset_dir: str | Path) -> dict | None:
    """The dataset's vocabulary: {'vocab_size', 'tokenizer': 'char'|'gpt2', 'chars' (char only)}, or None."""
    meta = _read_meta(Path(dataset_dir))
    return None if meta is None else vocabulary(meta)


def declared_token_dtype(dataset_dir: str | Path) -> str | None:
    """The token dtype meta.json declares (raygpt.prepare writes 'uint16'; any other is refused), or None
    for data prepared elsewhere (nanoGPT writes no meta.json, or a meta.pkl), whose width is unknown."""
    meta = _read_meta(Path(dataset_dir))
    return None if meta is None else meta.get("dtype")


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
