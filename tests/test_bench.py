"""raygpt.bench: the training step timed on random tokens, with the dataset's vocabulary."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
        (["--threads", "0"], "--threads must be at least 1, got 0"),
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


# --- CPU threads and progress: the first line says how many threads, progress goes to stderr

REPO = Path(__file__).resolve().parents[1]


def bench_cli(tmp_path, *args, cores: set[int] | None = None) -> subprocess.CompletedProcess:
    """python -m raygpt.bench on the tiny model, on `cores` alone where given (as taskset would)."""
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    return subprocess.run([sys.executable, "-m", "raygpt.bench", *TINY, f"--data_dir={tmp_path}", "--dataset=none",
                           *args], capture_output=True, text=True, timeout=120, preexec_fn=pin,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip


def test_bench_says_its_threads_first_and_its_progress_on_stderr(tmp_path):
    one_core = {min(os.sched_getaffinity(0))}
    chosen = bench_cli(tmp_path, cores=one_core)
    assert chosen.returncode == 0, chosen.stderr
    first, *table = chosen.stdout.splitlines()
    assert first == "cpu: 1 thread (of 1 core; --threads N to change)"
    assert table[0].startswith("| device |") and len(table) == 3  # stdout: the line and the table alone
    assert re.match(r"warm-up step 1/1: [\d,.]+ ms\nstep 1/2: [\d,.]+ ms\n", chosen.stderr), chosen.stderr


def test_bench_steps_run_on_the_threads_asked_and_leave_torch_as_found(tmp_path, capsys, monkeypatch):
    seen = []
    time_steps = bench.time_steps
    monkeypatch.setattr(bench, "time_steps", lambda *args: seen.append(torch.get_num_threads()) or time_steps(*args))
    before = torch.get_num_threads()
    threads = 2 if before != 2 else 3
    assert bench.main([*TINY, f"--data_dir={tmp_path}", "--dataset=none", "--threads", str(threads)]) == 0
    assert seen == [threads] and torch.get_num_threads() == before
    assert capsys.readouterr().out.startswith(f"cpu: {threads} threads (of ")


def test_bench_says_it_compiles_before_the_compile_starts(tmp_path, capsys, monkeypatch):
    """A GPU config's compile_mode on a CPU: the mode it compiles in, and that a CPU compile takes long."""
    monkeypatch.setattr(bench, "time_steps", lambda *args: [0.01])  # the notices, not the minutes of compile
    args = [a for a in TINY if a != "--compile=False"] + ["--compile=True", "--compile_mode=reduce-overhead"]
    assert bench.main([*args, f"--data_dir={tmp_path}", "--dataset=none"]) == 0
    out, err = capsys.readouterr()
    assert params_in_table(out) and re.split(r"\s*\|\s*", out.splitlines()[-1])[6] == "default"  # the mode it ran
    assert err.splitlines() == [
        "compile_mode=reduce-overhead uses CUDA graphs, which need a GPU: compiling for the CPU in the default mode",
        "compiling the model (torch.compile on CPU can take minutes; --compile=False to skip)",
    ]
