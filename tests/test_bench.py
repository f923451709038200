"""raygpt.bench: the training step timed on random tokens, with the dataset's vocabulary."""

import json
import re

from raygpt import bench
from raygpt.model import GPT, GPTConfig

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2", "--device=cpu",
        "--compile=False", "--gradient_accumulation_steps=1", "--steps", "2", "--warmup", "1"]  # fmt: skip


def params_in_table(text: str) -> str:
    row = text.strip().splitlines()[-1]
    return re.split(r"\s*\|\s*", row)[2]


def test_bench_builds_the_model_the_dataset_trains(char_data, capsys):
    args = [*TINY, f"--data_dir={char_data}", "--dataset=shakespeare_char"]
    assert bench.main(args) == 0
    expected = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=65)).get_num_params()
    assert params_in_table(capsys.readouterr().out) == f"{expected / 1e6:.2f}M"


def test_bench_without_a_dataset_uses_the_padded_gpt2_vocabulary(tmp_path, capsys):
    assert bench.main([*TINY, f"--data_dir={tmp_path}", "--dataset=none"]) == 0
    expected = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50304)).get_num_params()
    assert params_in_table(capsys.readouterr().out) == f"{expected / 1e6:.2f}M"


def test_bench_refuses_a_bad_meta_json_in_one_line(tmp_path, capsys):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "meta.json").write_text(json.dumps({"vocab_size": "many"}))
    assert bench.main([*TINY, f"--data_dir={tmp_path}", "--dataset=broken"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "meta.json" in err and "\n" not in err
