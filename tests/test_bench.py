"""raygpt.bench: the training step timed on random tokens, with the dataset's vocabulary."""

import json
import re

import pytest

from raygpt import bench
from raygpt.core.model import GPT, GPTConfig

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


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--vocab-size", "0"], "--vocab-size must be from 1 to 65,536 (token ids are uint16), got 0"),
        (["--vocab-size", "-5"], "--vocab-size must be from 1 to 65,536 (token ids are uint16), got -5"),
        (["--vocab-size", "70000"], "--vocab-size must be from 1 to 65,536 (token ids are uint16), got 70000"),
        (["--profile", "{tmp}/afile"], "--profile '{tmp}/afile' must name a folder for the trace"),
        (["--profile", "{tmp}/afile/trace"], "--profile {tmp}/afile/trace: {tmp}/afile is not a writable folder"),
        (["--profile", ""], "--profile '' must name a folder for the trace"),
        (["--n_embd=1000000", "--n_layer=100"], "parameters, micro-batch 2 x 16 tokens) but this host"),
        (["--batch_size=100000000"], "micro-batch 100000000 x 16 tokens"),
        (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    ],
)
def test_bench_refuses_what_it_cannot_run_in_one_line_before_building_anything(tmp_path, capsys, extra, message):
    (tmp_path / "afile").write_text("not a folder")
    try:
        code = bench.main([*TINY, f"--data_dir={tmp_path}", "--dataset=none", *(a.format(tmp=tmp_path) for a in extra)])
    except SystemExit as e:  # argparse's refusal
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    assert message.format(tmp=tmp_path) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_bench_with_a_block_longer_than_its_usual_random_tokens_runs(tmp_path, capsys):
    long_block = [a for a in TINY if not a.startswith("--block_size")] + ["--block_size=16"]
    bench.RANDOM_TOKENS, saved = 8, bench.RANDOM_TOKENS
    try:
        assert bench.main([*long_block, f"--data_dir={tmp_path}", "--dataset=none"]) == 0, capsys.readouterr().err
    finally:
        bench.RANDOM_TOKENS = saved
