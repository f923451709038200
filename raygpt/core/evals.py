"""Scoring a trained model: multiple-choice completions in HellaSwag's format, and bits per byte of a
token file. No Ray: `python -m raygpt.eval` and the training side call the same functions.

Multiple choice is scored completion style, as llm.c's and build-nanogpt's HellaSwag scripts do: each
ending follows the context after one space, and the cross-entropy of its tokens, each given every token
before it, is summed. `acc` takes the ending of the lowest sum, `acc_norm` the one of the lowest mean per
token. (lm-eval-harness asks the same question but divides by the ending's length in characters: its
acc_norm differs.) An example with more than block_size + 1 tokens keeps the ending whole and the last
tokens of its context: truncated from the left, as lm-eval-harness does.

Bits per byte is the loss in bits over the UTF-8 bytes the predicted tokens stand for, so that models of
different tokenizers (characters, GPT-2 BPE) can be compared on the same text.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from raygpt.core.step import Precision
from raygpt.core.tokenizer import Tokenizer, gpt2_encoding
from raygpt.errors import RaygptError, one_line

DEFAULT_BATCH_SIZE = 64  # sequences per forward pass
Progress = Callable[[int], None]  # told how many more units (endings, windows) are done


class EvalError(RaygptError, ValueError):
    """Examples or data that cannot be scored as given; the message is one line."""


# ---- multiple choice: reading, tokenizing, scoring ---------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One multiple-choice example: a context, two or more endings, and the index of the right one."""

    context: str
    endings: tuple[str, ...]
    label: int
    where: str  # FILE:LINE, for messages


def read_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """The first `limit` (default: all) examples of a jsonl file in HellaSwag's format: one JSON object a
    line with `ctx` (a string), `endings` (two or more strings) and `label` (the right ending's index).
    Other keys are ignored, blank lines skipped; the first fault is an EvalError naming FILE:LINE."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EvalError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    examples = []
    for number, line in enumerate(data.splitlines(), 1):
        if limit is not None and len(examples) >= limit:
            break
        if line.strip():
            examples.append(parse_example(line, f"{path}:{number}"))
    if not examples:
        raise EvalError(f"{path} holds no examples: expected one JSON object a line with ctx, endings and label")
    return examples


def parse_example(line: bytes, where: str) -> Example:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise EvalError(f"{where}: not UTF-8 text") from None
    except (ValueError, RecursionError) as e:
        raise EvalError(f"{where}: not valid JSON ({one_line(str(e)) or type(e).__name__})") from None
    if not isinstance(record, dict):
        raise EvalError(f"{where}: expected a JSON object with ctx, endings and label, got {type(record).__name__}")
    context, endings = record.get("ctx"), record.get("endings")
    if not (isinstance(context, str) and context.strip()):
        raise EvalError(f"{where}: ctx must be a string with some text: the first ending token is predicted from it")
    if not (isinstance(endings, list) and len(endings) >= 2 and all(isinstance(e, str) for e in endings)):
        raise EvalError(f"{where}: endings must be a list of two or more strings")
    empty = [i for i, ending in enumerate(endings) if not ending.strip()]
    if empty:
        raise EvalError(f"{where}: ending {empty[0]} is empty: every ending needs text to score")
    return Example(context, tuple(endings), parse_label(record.get("label"), len(endings), where), where)


def parse_label(label, n_endings: int, where: str) -> int:
    """The right ending's index: an integer, or its decimal digits in a string (as Hugging Face's copy of
    HellaSwag writes it)."""
    if label is None or label == "":
        raise EvalError(f"{where}: no label (HellaSwag's test split has none: score the val split)")
    if isinstance(label, str) and label.isascii() and label.isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool):
        raise EvalError(f"{where}: label must be an integer index into endings, got {json.dumps(label)[:40]}")
    if not 0 <= label < n_endings:
        raise EvalError(f"{where}: label {label} is out of range: the example has {n_endings} endings, numbered from 0")
    return label


@dataclass(frozen=True)
class EncodedExample:
    """A Example as token rows, one per ending: its context (truncated from the left where the row would
    not fit) followed by the ending, whose tokens are the row's last `ending_lengths[i]`."""

    rows: tuple[tuple[int, ...], ...]
    ending_lengths: tuple[int, ...]
    label: int
    truncated: bool


def encode_examples(
    examples: list[Example], tokenizer: Tokenizer, block_size: int, vocab_size: int
) -> list[EncodedExample]:
    """Each example's rows for a model of this context and vocabulary. A row may hold block_size + 1
    tokens: the model reads all but the last, and predicts all but the first."""
    encoded = []
    for example in examples:
        context = encode(tokenizer, example.context, vocab_size, f"{example.where}: ctx")
        rows, lengths = [], []
        for i, ending in enumerate(example.endings):
            tokens = encode(tokenizer, " " + ending, vocab_size, f"{example.where}: ending {i}")
            if len(tokens) > block_size:
                raise EvalError(
                    f"{example.where}: ending {i} is {len(tokens)} tokens, more than the model's block_size "
                    f"{block_size}: it cannot be scored in one pass"
                )
            rows.append(tuple(context + tokens)[-(block_size + 1) :])
            lengths.append(len(tokens))
        truncated = any(len(context) + n > block_size + 1 for n in lengths)
        encoded.append(EncodedExample(tuple(rows), tuple(lengths), example.label, truncated))
    return encoded


def encode(tokenizer: Tokenizer, text: str, vocab_size: int, what: str) -> list[int]:
    """text's token ids, all of them ids the model has."""
    try:
        ids = tokenizer.encode(text)
    except ValueError as e:  # a character table without some character of the text
        raise EvalError(f"{what} has {e}: a character-level model reads only its dataset's characters") from None
    if max(ids, default=0) >= vocab_size:
        raise EvalError(
            f"{what} has token id {max(ids)}, but the model's vocabulary has {vocab_size} tokens: it was not "
            f"trained on {tokenizer.name} tokens"
        )
    return ids


def ending_losses(
    model: torch.nn.Module,
    encoded: list[EncodedExample],
    dtype: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> list[list[float]]:
    """For each example, each ending's summed cross-entropy (nats) given what precedes it. All endings of
    all examples are batched together, longest first: each batch pads little, and one too large for the
    device's memory fails at once. The model runs where its weights are, in eval mode."""
    precision = Precision(dtype, device_of(model))
    rows = [(row, n) for example in encoded for row, n in zip(example.rows, example.ending_lengths)]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    sums = [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        token_losses = forward_losses(model, *padded_batch([rows[i] for i in batch]), precision)
        for i, total in zip(batch, token_losses.sum(dim=1).tolist()):
            sums[i] = total
        if progress:
            progress(len(batch))
    per_example, start = [], 0
    for example in encoded:
        per_example.append(sums[start : start + len(example.rows)])
        start += len(example.rows)
    return per_example


def choice_metrics(encoded: list[EncodedExample], losses: list[list[float]]) -> dict:
    """acc (lowest summed loss) and acc_norm (lowest mean loss per token); a tie goes to the first ending."""
    correct = correct_norm = 0
    for example, sums in zip(encoded, losses):
        means = [total / n for total, n in zip(sums, example.ending_lengths)]
        correct += min(range(len(sums)), key=sums.__getitem__) == example.label
        correct_norm += min(range(len(means)), key=means.__getitem__) == example.label
    n = len(encoded)
    return {
        "acc": correct / n,
        "acc_norm": correct_norm / n,
        "correct": correct,
        "correct_norm": correct_norm,
        "examples": n,
        "truncated": sum(example.truncated for example in encoded),
    }


def evaluate_multiple_choice(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    examples: list[Example],
    dtype: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> dict:
    """choice_metrics of `examples` for a GPT (on the device it is on) and the tokenizer it was trained with."""
    encoded = encode_examples(examples, tokenizer, model.config.block_size, model.config.vocab_size)
    return choice_metrics(encoded, ending_losses(model, encoded, dtype, batch_size, progress))


# ---- the forward pass both scorers share -------------------------------------------------------------


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def forward_losses(
    model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, precision: Precision
) -> torch.Tensor:
    """The cross-entropy in nats of each target (padded_batch's), 0 where there is none."""
    device = device_of(model)
    inputs, targets = inputs.to(device), targets.to(device)
    scored = targets >= 0
    losses = torch.zeros(targets.shape, dtype=torch.float32, device=device)
    with evaluating(model), torch.no_grad(), precision.autocast():
        # The vocabulary's logits of the scored positions only: a multiple-choice row is mostly context,
        # and the projection onto 50k tokens (and its softmax) is most of a small model's forward pass.
        logits = model.lm_head(model.hidden_states(inputs)[scored])
        losses[scored] = F.cross_entropy(logits.float(), targets[scored], reduction="none")
    return losses


def padded_batch(rows: list[tuple[Sequence[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets, (len(rows), longest row - 1) each, for rows of (tokens, n): the last n tokens
    are scored, each predicted from the tokens before it in the row. Rows are padded on the right:
    attention is causal, so the padding changes nothing before it. Targets are -1 where nothing is scored."""
    width = max(len(tokens) for tokens, _ in rows) - 1
    inputs = np.zeros((len(rows), width), dtype=np.int64)
    targets = np.full((len(rows), width), -1, dtype=np.int64)
    for b, (tokens, n) in enumerate(rows):
        row = np.asarray(tokens, dtype=np.int64)
        inputs[b, : len(row) - 1] = row[:-1]
        targets[b, len(row) - 1 - n : len(row) - 1] = row[len(row) - n :]
    return torch.from_numpy(inputs), torch.from_numpy(targets)


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """The model in eval mode (no dropout), put back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ---- bits per byte ------------------------------------------------------------------------------------


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> torch.Tensor:
    """The UTF-8 bytes each of the model's token ids stands for: a character's, or a GPT-2 token's. Ids that
    stand for no text have 0: GPT-2's <|endoftext|> and the padding past GPT-2's vocabulary."""
    lengths = torch.zeros(vocab_size, dtype=torch.long)
    if tokenizer.chars is not None:
        for i, char in enumerate(tokenizer.chars[:vocab_size]):
            lengths[i] = len(char.encode("utf-8", "surrogatepass"))
        return lengths
    encoding = gpt2_encoding()
    special = {encoding.encode_single_token(token) for token in encoding.special_tokens_set}
    for i in range(min(encoding.n_vocab, vocab_size)):
        if i not in special:
            lengths[i] = len(encoding.decode_single_token_bytes(i))
    return lengths


def bpb_windows(n_tokens: int, block_size: int, limit: int | None = None) -> list[tuple[int, int]]:
    """(start, end) of the token windows bits per byte reads: consecutive and non-overlapping, each of
    block_size + 1 tokens but the last, which may be shorter; the windows share their boundary token, so
    every token but the first is predicted once, from the tokens before it in its window."""
    starts = range(0, n_tokens - 1, block_size)[:limit]
    return [(start, min(start + block_size + 1, n_tokens)) for start in starts]


def bits_per_byte(
    model: torch.nn.Module,
    tokens: np.ndarray,
    byte_lengths: torch.Tensor,
    dtype: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    limit: int | None = None,
    progress: Progress | None = None,
) -> dict:
    """Bits per byte of a token sequence (a dataset's val.bin, memmapped): nats summed over the predicted
    tokens (bpb_windows; the first `limit` windows), over ln 2, over the bytes those tokens stand for.
    Tokens of no bytes (<|endoftext|>) are not predicted: no text is."""
    windows = bpb_windows(len(tokens), model.config.block_size, limit)
    if not windows:
        raise EvalError(f"{len(tokens)} tokens: bits per byte needs at least 2 (one to predict the other from)")
    vocab_size, precision = len(byte_lengths), Precision(dtype, device_of(model))
    nats, n_tokens, n_bytes = 0.0, 0, 0
    for first in range(0, len(windows), batch_size):
        rows = []
        for start, end in windows[first : first + batch_size]:
            row = np.asarray(tokens[start:end], dtype=np.int64)
            if row.max() >= vocab_size:
                position = start + int(np.argmax(row >= vocab_size))
                raise EvalError(
                    f"token {position:,} is id {int(row.max())}, but the model's vocabulary has {vocab_size} "
                    "tokens: the data was prepared with another tokenizer"
                )
            rows.append((row, len(row) - 1))
        inputs, targets = padded_batch(rows)
        losses = forward_losses(model, inputs, targets, precision)
        counted = (targets >= 0) & (byte_lengths[targets.clamp(min=0)] > 0)
        nats += losses.cpu()[counted].double().sum().item()
        n_tokens += int(counted.sum())
        n_bytes += int(byte_lengths[targets[counted]].sum())
        if progress:
            progress(len(rows))
    if n_bytes == 0:
        raise EvalError("the tokens stand for no text (all are <|endoftext|>): there are no bytes to score")
    return {
        "bits_per_byte": nats / math.log(2) / n_bytes,
        "loss": nats / n_tokens,  # nats per token, as training's val loss
        "tokens": n_tokens,
        "bytes": n_bytes,
        "windows": len(windows),
    }
