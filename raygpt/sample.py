"""`python -m raygpt.sample`: text from a trained model, as nanoGPT's sample.py.

python -m raygpt.sample --out-dir out-shakespeare-char --start "ROMEO:" --num-samples 3
python -m raygpt.sample --checkpoint ~/ray_results/run/checkpoint_2026-... --start FILE:prompt.txt
python -m raygpt.sample --init-from gpt2 --start "Hello, I'm a language model,"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from raygpt import checkpoint
from raygpt.errors import refuse
from raygpt.model import GPT, GPTConfig, clean_state_dict
from raygpt.step import Precision, PrecisionError
from raygpt.tokenizer import Tokenizer, load_meta


def load_model(args) -> tuple[GPT, Tokenizer]:
    """The model and its tokenizer, from a Ray checkpoint folder, an out_dir, or GPT-2 weights."""
    if args.init_from != "resume":
        return GPT.from_pretrained(args.init_from, dict(dropout=0.0)), Tokenizer.from_meta(None)
    path = Path(args.checkpoint or args.out_dir).expanduser()
    ckpt_path = path / checkpoint.CKPT_NAME if path.is_dir() else path
    state = checkpoint.load(ckpt_path)
    model = GPT(GPTConfig(**{**state["model_args"], "dropout": 0.0}))
    model.load_state_dict(clean_state_dict(state["model"]))
    # The dataset's meta.json says how to decode; without one, GPT-2 BPE (as nanoGPT).
    config = state.get("config") or {}
    meta = None
    if config.get("data_dir") and config.get("dataset"):
        meta = load_meta(Path(config["data_dir"]) / config["dataset"])
    return model, Tokenizer.from_meta(meta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raygpt.sample", description="Sample text from a GPT.")
    parser.add_argument(
        "--init-from",
        default="resume",
        help="'resume' (from --out-dir / --checkpoint) or gpt2, gpt2-medium, gpt2-large, gpt2-xl",
    )
    parser.add_argument("--out-dir", default="out", help="folder holding ckpt.pt")
    parser.add_argument("--checkpoint", help="a Ray checkpoint folder or a ckpt.pt file (wins over --out-dir)")
    parser.add_argument("--start", default="\n", help="prompt text, or FILE:path to read it from a file")
    parser.add_argument("--num-samples", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=0.8, help="< 1 less random, > 1 more random")
    parser.add_argument("--top-k", type=int, default=200, help="keep only the top_k most likely tokens")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model first")
    args = parser.parse_args(argv)

    try:
        model, tokenizer = load_model(args)
        start = args.start
        if start.startswith("FILE:"):
            start = Path(start[5:]).read_text(encoding="utf-8")
        start_ids = tokenizer.encode(start)
    except (checkpoint.CheckpointError, OSError, ValueError, KeyError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not start_ids:
        print("error: the prompt is empty after tokenization", file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)
    try:
        precision = Precision(args.dtype, args.device)
    except (PrecisionError, RuntimeError) as e:
        return refuse(e)
    model.eval().to(args.device)
    if args.compile:
        model = torch.compile(model)

    x = torch.tensor(start_ids, dtype=torch.long, device=args.device)[None, ...]
    with torch.no_grad(), precision.autocast():
        for _ in range(args.num_samples):
            y = model.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
            print(tokenizer.decode(y[0].tolist()))
            print("---------------")
    return 0


if __name__ == "__main__":
    sys.exit(main())
