"""Where the time of scoring multiple choice goes: the same HellaSwag-sized rows as eval_speed.py, scored in
one process three ways, each timed twice (the first pass holds CUDA's warm-up):

- every position: the model's forward with targets (logits of every position and its own mean loss), then
  the cross-entropy of the scored positions, as raygpt.eval did before session 16;
- scored positions: core/evals.forward_losses (the trunk, then logits of the scored positions only);
- trunk only: GPT.hidden_states with no vocabulary projection, the floor.

    python benchmarks/eval_forward_profile.py [--examples 10042] [--batch-size 256] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_speed import GPT2_124M, offline_gpt2_bpe, write_examples  # noqa: E402

from raygpt.core import evals  # noqa: E402
from raygpt.core.model import GPT, GPTConfig  # noqa: E402
from raygpt.core.step import Precision  # noqa: E402
from raygpt.core.tokenizer import Tokenizer  # noqa: E402


def every_position(model, inputs, targets, precision):
    with torch.no_grad(), precision.autocast():
        logits, _ = model(inputs, targets)
    scored = targets >= 0
    losses = torch.zeros(targets.shape, device=inputs.device)
    losses[scored] = F.cross_entropy(logits[scored].float(), targets[scored], reduction="none")
    return losses


def trunk_only(model, inputs, targets, precision):
    with torch.no_grad(), precision.autocast():
        return model.hidden_states(inputs).float().sum(-1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=10042)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        offline_gpt2_bpe(Path(tmp) / "tiktoken-cache")
        write_examples(Path(tmp) / "examples.jsonl", args.examples)
        examples = evals.read_examples(Path(tmp) / "examples.jsonl")
        encoded = evals.encode_examples(examples, Tokenizer.from_meta(None), 1024, GPT2_124M["vocab_size"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(**GPT2_124M, dropout=0.0)).to(args.device).eval()
    rows = [(row, n) for example in encoded for row, n in zip(example.rows, example.ending_lengths)]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    precision = Precision("auto", torch.device(args.device))
    print(f"{len(rows):,} rows, {sum(len(r) for r, _ in rows):,} tokens, batch {args.batch_size}, {args.device}")
    ways = {"every position": every_position, "scored positions": evals.forward_losses, "trunk only": trunk_only}
    for name, forward in ways.items():
        for attempt in (1, 2):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for first in range(0, len(order), args.batch_size):
                inputs, targets = evals.padded_batch([rows[i] for i in order[first : first + args.batch_size]])
                forward(model, inputs.to(args.device), targets.to(args.device), precision).sum(dim=-1).tolist()
            print(f"{name}, pass {attempt}: {time.perf_counter() - start:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
