"""raygpt.prepare's console as a newcomer meets it: GPT-2 BPE on a machine without tiktoken's files and
without a network (one line, as for a missing corpus, and the same line from sample), and the dataset
folder named the same way by every dataset. Fast tier: real subprocesses, no Ray."""

import os
import subprocess
import sys

import pytest

from raygpt.core import checkpoint
from raygpt.core.model import GPT, GPTConfig
from raygpt.core.tokenizer import GPT2_VOCAB_SIZE

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 2000


def offline(tmp_path) -> dict:
    """No GPT-2 BPE files and no network: an empty TIKTOKEN_CACHE_DIR, and every download sent to a proxy
    on a port where nothing listens (refused at once, on any machine)."""
    cache = tmp_path / "empty-tiktoken-cache"
    cache.mkdir()
    env = {key: value for key, value in os.environ.items() if key.lower() not in ("no_proxy", "all_proxy")}
    return {**env, "TIKTOKEN_CACHE_DIR": str(cache), "HTTPS_PROXY": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}  # fmt: skip


def cli(module: str, *args, env=None, cwd=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    return lines[0]


def bpe_refusal(env: dict) -> str:
    return (
        "error: GPT-2 BPE needs tiktoken's gpt2 files, which could not be downloaded (ProxyError) and "
        f"TIKTOKEN_CACHE_DIR {env['TIKTOKEN_CACHE_DIR']} does not hold them: connect to the internet once, or set "
        "TIKTOKEN_CACHE_DIR to a copy of the tiktoken cache of a machine that has loaded GPT-2 BPE"
    )


@pytest.mark.parametrize(
    "command",
    [
        ["shakespeare"],  # as the README has it: the corpus would be downloaded too
        ["corpus", "--input", "{tmp}/docs.txt"],
    ],
)
def test_bpe_without_its_files_or_a_network_is_one_line_and_writes_nothing(tmp_path, command):
    (tmp_path / "docs.txt").write_text(TEXT)
    env = offline(tmp_path)
    argv = [arg.format(tmp=tmp_path) for arg in command]
    done = cli("raygpt.prepare", *argv, "--data-dir", tmp_path / "data", env=env)
    assert one_error_line(done).startswith(bpe_refusal(env))
    assert not (tmp_path / "data").exists()


def test_sample_gets_the_same_line(tmp_path):
    """A model of GPT-2's vocabulary decodes with GPT-2 BPE: sample loads it through the same function."""
    args = dict(n_layer=1, n_head=2, n_embd=8, block_size=8, bias=False, vocab_size=GPT2_VOCAB_SIZE)
    state = {"model": GPT(GPTConfig(**args)).state_dict(), "model_args": args, "iter_num": 1, "config": {}}
    checkpoint.save_atomic(state, tmp_path / "ckpt.pt")
    env = offline(tmp_path)
    done = cli("raygpt.sample", "--checkpoint", tmp_path / "ckpt.pt", "--start", "Hello", "--device", "cpu", env=env)
    assert one_error_line(done).startswith(bpe_refusal(env))


def test_every_dataset_names_its_folder_the_same_way(tmp_path, shakespeare_path):
    """A relative --data-dir (the default, `data`) is printed as the absolute folder, for the character
    set, the BPE set and a corpus alike, as the launcher names the folder it prepares."""
    (tmp_path / "docs.txt").write_text(TEXT)
    folders = {}
    commands = {
        "shakespeare_char": ["--input", shakespeare_path],
        "shakespeare": ["--input", shakespeare_path],
        "corpus": ["--input", "docs.txt", "--one-doc-per-line", "--val-fraction", "0.1"],
    }
    for dataset, extra in commands.items():
        done = cli("raygpt.prepare", dataset, *extra, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        folders[dataset] = done.stdout.strip().splitlines()[-1].rpartition(" -> ")[2]
    assert folders == {name: str(tmp_path.resolve() / "data" / name) for name in folders}
