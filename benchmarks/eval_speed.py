"""How long `python -m raygpt.eval` takes to score a HellaSwag-sized file with GPT-2 124M.

The speed needs no real data or weights: the file has HellaSwag's shape and size (10,042 examples of four
endings; contexts and endings cut from tiny Shakespeare at HellaSwag-like lengths) and the checkpoint holds
GPT-2 124M's shape with random weights. Each batch size is one run of the real CLI; the table gives its
wall time (process start to exit) and the scoring time it reports.

    python benchmarks/eval_speed.py --batch-sizes 64,256 [--device cuda] [--examples 10042]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from raygpt.core import checkpoint
from raygpt.core.model import GPT, GPTConfig

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "tinyshakespeare.txt"
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, bias=True, vocab_size=50257)


def offline_gpt2_bpe(cache: Path) -> None:
    """The GPU machines have no internet: give tiktoken the BPE files shipped in tests/data, under the names
    its cache looks for (the sha1 of each file's URL), unless TIKTOKEN_CACHE_DIR already holds them (a
    machine may set it to a folder that does not)."""
    url = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    names = {name: hashlib.sha1((url + name).encode()).hexdigest() for name in ("encoder.json", "vocab.bpe")}
    given = os.environ.get("TIKTOKEN_CACHE_DIR")
    if given and all((Path(given) / cached).is_file() for cached in names.values()):
        return
    cache.mkdir(parents=True, exist_ok=True)
    for name, cached in names.items():
        shutil.copyfile(CORPUS.parent / "gpt2-bpe" / name, cache / cached)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)


def words_between(words: list[str], rng: random.Random, low: int, high: int) -> str:
    start = rng.randrange(len(words) - high)
    return " ".join(words[start : start + rng.randint(low, high)])


def write_examples(path: Path, count: int, seed: int = 0) -> None:
    """HellaSwag's shape: a context of ~30-60 words and four endings of ~10-30 words each."""
    words = CORPUS.read_text().split()
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(count):
            example = {
                "ctx": words_between(words, rng, 30, 60),
                "endings": [words_between(words, rng, 10, 30) for _ in range(4)],
                "label": rng.randrange(4),
            }
            f.write(json.dumps(example) + "\n")


def write_random_gpt2(path: Path) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**GPT2_124M, dropout=0.0))
    checkpoint.save_atomic({"model": model.state_dict(), "model_args": GPT2_124M, "iter_num": 0, "config": {}}, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="64,256")
    parser.add_argument("--examples", type=int, default=10042)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        examples, ckpt = Path(tmp) / "hellaswag_shaped.jsonl", Path(tmp) / "ckpt.pt"
        offline_gpt2_bpe(Path(tmp) / "tiktoken-cache")
        write_examples(examples, args.examples)
        write_random_gpt2(ckpt)
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
        print("| batch size | examples | wall s (process) | scoring s (reported) | device |")
        print("| ---: | ---: | ---: | ---: | --- |")
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            command = [sys.executable, "-m", "raygpt.eval", str(examples), "--checkpoint", str(ckpt),
                       "--device", args.device, "--batch-size", str(batch_size), "--json"]  # fmt: skip
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {batch_size} | {result['examples']} | {wall:.1f} | {result['seconds']:.1f} | {device} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
