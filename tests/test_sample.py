"""raygpt.sample from a trained checkpoint, with the dataset's own tokenizer."""

import subprocess
import sys

import torch

from raygpt.core import checkpoint
from raygpt.core.model import GPT, GPTConfig


def write_char_checkpoint(out_dir, data_dir):
    torch.manual_seed(0)
    model_args = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, bias=False, vocab_size=65, dropout=0.0)
    model = GPT(GPTConfig(**model_args))
    state = {
        "model": {"_orig_mod." + k: v for k, v in model.state_dict().items()},
        "model_args": model_args,
        "iter_num": 1,
        "config": {"data_dir": str(data_dir), "dataset": "shakespeare_char"},
    }
    checkpoint.save_atomic(state, out_dir / "ckpt.pt")


def sample(*args):
    return subprocess.run([sys.executable, "-m", "raygpt.sample", *args], capture_output=True, text=True, timeout=120)


def test_sample_decodes_with_the_char_table(tmp_path, char_data):
    write_char_checkpoint(tmp_path, char_data)
    result = sample(
        "--out-dir",
        str(tmp_path),
        "--start",
        "ROMEO:",
        "--num-samples",
        "2",
        "--max-new-tokens",
        "40",
        "--device",
        "cpu",
        "--seed",
        "3",
    )
    assert result.returncode == 0, result.stderr
    texts = result.stdout.split("---------------\n")
    assert len(texts) == 3 and all(t.startswith("ROMEO:") and len(t.rstrip("\n")) >= 40 for t in texts[:2])
    again = sample(
        "--out-dir",
        str(tmp_path),
        "--start",
        "ROMEO:",
        "--num-samples",
        "2",
        "--max-new-tokens",
        "40",
        "--device",
        "cpu",
        "--seed",
        "3",
    )
    assert again.stdout == result.stdout  # same seed, same text


def test_sample_prompt_from_file_and_errors(tmp_path, char_data):
    write_char_checkpoint(tmp_path, char_data)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("KING:")
    result = sample(
        "--checkpoint",
        str(tmp_path / "ckpt.pt"),
        "--start",
        f"FILE:{prompt}",
        "--num-samples",
        "1",
        "--max-new-tokens",
        "5",
        "--device",
        "cpu",
    )
    assert result.returncode == 0 and result.stdout.startswith("KING:")
    missing = sample("--out-dir", str(tmp_path / "nothing"), "--device", "cpu")
    assert missing.returncode == 2 and "no checkpoint at" in missing.stderr
    unknown = sample("--out-dir", str(tmp_path), "--start", "日本", "--device", "cpu")
    assert unknown.returncode == 2 and "not in the vocabulary" in unknown.stderr
