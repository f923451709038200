"""raygpt.sample's command line: what it refuses (one line, exit 2), greedy and unfiltered sampling, the
checkpoint and meta.json it finds, and its help. Fast tier: tiny models on the CPU, no Ray."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from raygpt import sample
from raygpt.core import checkpoint
from raygpt.core.model import GPT, GPTConfig
from raygpt.core.tokenizer import GPT2_VOCAB_SIZE, Tokenizer

CHARS = sorted(set("\n !',.:;?-" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "abcdefghijklmnopqrstuvwxyz"))
VOCAB_SIZE = len(CHARS)
BLOCK_SIZE = 32


def write_meta(dataset_dir, chars=CHARS):
    dataset_dir.mkdir(parents=True, exist_ok=True)
    meta = {"vocab_size": len(chars), "tokenizer": "char", "chars": chars, "dtype": "uint16"}
    (dataset_dir / "meta.json").write_text(json.dumps(meta))
    return dataset_dir / "meta.json"


def write_checkpoint(out_dir, data_dir, vocab_size=VOCAB_SIZE, dataset="tiny_char"):
    """A 1-layer model's ckpt.pt as training writes it, trained on data_dir/dataset; returns the model."""
    torch.manual_seed(0)
    model_args = dict(n_layer=1, n_head=2, n_embd=16, block_size=BLOCK_SIZE, bias=False, vocab_size=vocab_size)
    model = GPT(GPTConfig(**model_args, dropout=0.0))
    state = {
        "model": {"_orig_mod." + k: v for k, v in model.state_dict().items()},
        "model_args": model_args,
        "iter_num": 1,
        "config": {"data_dir": str(data_dir), "dataset": dataset},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.save_atomic(state, out_dir / checkpoint.CKPT_NAME)
    return model.eval()


@pytest.fixture
def char_run(tmp_path):
    """(out_dir, data_dir) of a char-level run whose dataset's meta.json is in place."""
    write_meta(tmp_path / "data" / "tiny_char")
    write_checkpoint(tmp_path / "out", tmp_path / "data")
    return tmp_path / "out", tmp_path / "data"


def run(capsys, *args):
    """sample.main in this process: (exit status, stdout, stderr)."""
    code = sample.main([*args, "--device", "cpu"] if "--device" not in args else list(args))
    out, err = capsys.readouterr()
    return code, out, err


def refused(code, err) -> str:
    """The one `error: ...` line of a refusal."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def texts(out: str) -> list[str]:
    """The samples printed, without their separator lines."""
    return [text[:-1] for text in out.split("---------------\n")[:-1]]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "raygpt.sample", *args], capture_output=True, text=True, timeout=120)


# --- 1. the tokenizer comes from the checkpoint's dataset, never a guess


def test_char_checkpoint_without_its_meta_is_refused_not_decoded_as_gpt2(tmp_path):
    write_checkpoint(tmp_path / "out", tmp_path / "data")  # data/tiny_char/meta.json was never there
    result = cli("--out-dir", str(tmp_path / "out"), "--device", "cpu", "--num-samples", "1")
    line = refused(result.returncode, result.stderr)
    assert f"vocabulary has {VOCAB_SIZE} tokens, not GPT-2's" in line and str(tmp_path / "data" / "tiny_char") in line
    assert "--meta PATH/meta.json" in line and result.stdout == ""


def test_dataset_at_a_uri_needs_a_local_meta(tmp_path, capsys):
    write_checkpoint(tmp_path / "out", "s3://bucket/data")
    line = refused(*run(capsys, "--out-dir", str(tmp_path / "out"))[::2])
    assert "no meta.json or meta.pkl in s3://bucket/data/tiny_char: pass the dataset's with --meta" in line


def test_meta_option_gives_the_table_as_a_file_or_its_folder(tmp_path, capsys):
    write_checkpoint(tmp_path / "out", tmp_path / "moved-away")
    meta_json = write_meta(tmp_path / "elsewhere" / "tiny_char")
    for meta in (meta_json, meta_json.parent):
        code, out, err = run(capsys, "--out-dir", str(tmp_path / "out"), "--meta", str(meta), "--start", "ROMEO:",
                             "--num-samples", "1", "--max-new-tokens", "10")  # fmt: skip
        assert code == 0, err
        assert texts(out)[0].startswith("ROMEO:") and len(texts(out)[0]) == 16


@pytest.mark.parametrize("where", ["dataset", "--meta"])
def test_damaged_meta_json_is_one_line(tmp_path, capsys, where):
    dataset_dir = tmp_path / "data" / "tiny_char"
    dataset_dir.mkdir(parents=True)
    (dataset_dir / "meta.json").write_text('{"vocab_size": 62, "chars": [')
    write_checkpoint(tmp_path / "out", tmp_path / "data")
    meta = ["--meta", str(dataset_dir / "meta.json")] if where == "--meta" else []
    line = refused(*run(capsys, "--out-dir", str(tmp_path / "out"), *meta)[::2])
    assert f"{dataset_dir / 'meta.json'} is not valid JSON" in line


def test_meta_of_another_dataset_is_refused(tmp_path, capsys, char_run):
    out_dir, _ = char_run
    other = write_meta(tmp_path / "other", chars=list("abc\n"))
    line = refused(*run(capsys, "--out-dir", str(out_dir), "--meta", str(other))[::2])
    assert f"char vocabulary of 4 tokens but the checkpoint's model has {VOCAB_SIZE}" in line and "--meta" in line


@pytest.mark.parametrize(
    "meta, message",
    [
        ("missing.json", "no such file or folder"),
        ("notes.txt", "expected a meta.json or meta.pkl"),
        ("", "the folder holds no meta.json or meta.pkl"),
    ],
)
def test_meta_option_that_names_no_meta_is_one_line(tmp_path, capsys, char_run, meta, message):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    path = tmp_path / meta if meta else tmp_path / "empty"
    assert message in refused(*run(capsys, "--out-dir", str(char_run[0]), "--meta", str(path))[::2])


def test_gpt2_vocabulary_without_meta_decodes_as_gpt2_bpe(tmp_path, capsys):
    write_checkpoint(tmp_path / "out", tmp_path / "no-data", vocab_size=GPT2_VOCAB_SIZE, dataset="openwebtext")
    code, out, err = run(capsys, "--out-dir", str(tmp_path / "out"), "--start", "Hello, I'm", "--num-samples", "1",
                         "--max-new-tokens", "3")  # fmt: skip
    assert code == 0, err
    assert texts(out)[0].startswith("Hello, I'm")


def test_padding_ids_of_a_padded_gpt2_vocabulary_decode_as_replacement_characters():
    hello, comma = Tokenizer(None).encode("Hello"), Tokenizer(None).encode(",")
    assert sample.decode(Tokenizer(None), [*hello, 50300, *comma]) == "Hello\ufffd,"


# --- 2. temperature, top_k and the other numbers


def test_temperature_zero_is_greedy_decoding(tmp_path, capsys):
    write_meta(tmp_path / "data" / "tiny_char")
    model = write_checkpoint(tmp_path / "out", tmp_path / "data")
    outputs = []
    for seed, num_samples in (("1", "2"), ("2", "1")):
        code, out, err = run(capsys, "--out-dir", str(tmp_path / "out"), "--start", "KING:", "--temperature", "0",
                             "--num-samples", num_samples, "--max-new-tokens", "40", "--seed", seed)  # fmt: skip
        assert code == 0, err
        outputs.append(texts(out))
    assert outputs[0] == outputs[1] * 2  # no randomness left: every seed, every sample the same
    stoi = {c: i for i, c in enumerate(CHARS)}
    idx = torch.tensor([[stoi[c] for c in "KING:"]])
    with torch.no_grad():
        for _ in range(40):  # argmax of the model's own forward pass, the last block_size tokens in view
            logits, _ = model(idx[:, -BLOCK_SIZE:])
            idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert outputs[0][0] == "".join(CHARS[i] for i in idx[0].tolist())


def test_top_k_zero_samples_from_every_token(capsys, char_run):
    outputs = []
    for top_k in ("0", str(VOCAB_SIZE)):  # no filtering = keeping all of the vocabulary
        code, out, err = run(capsys, "--out-dir", str(char_run[0]), "--top-k", top_k, "--num-samples", "2",
                             "--max-new-tokens", "30", "--seed", "5")  # fmt: skip
        assert code == 0, err
        outputs.append(out)
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-0.5"], "--temperature must be 0 (greedy) or more, got -0.5"),
        (["--temperature", "nan"], "--temperature must be 0 (greedy) or more, got nan"),
        (["--top-k", "-1"], "--top-k must be 0 (no filtering) or more, got -1"),
        (["--num-samples", "0"], "--num-samples must be at least 1, got 0"),
        (["--max-new-tokens", "-3"], "--max-new-tokens must be at least 1, got -3"),
        (["--init-from", "gpt2", "--meta", "m.json"], "--checkpoint and --meta are for --init-from resume"),
    ],
)
def test_numbers_no_sampling_can_use_are_refused(capsys, char_run, args, message):
    line = refused(*run(capsys, "--out-dir", str(char_run[0]), *args)[::2])
    assert line == f"error: {message}" or message in line


def test_all_bad_numbers_are_named_in_the_one_line(capsys, char_run):
    line = refused(*run(capsys, "--out-dir", str(char_run[0]), "--temperature", "-1", "--num-samples", "0")[::2])
    assert "--temperature" in line and "--num-samples" in line


def test_prompt_longer_than_block_size(capsys, char_run):
    prompt = ("To be, or not to be: that is the question. " * 3).strip()
    assert len(prompt) > BLOCK_SIZE
    code, out, err = run(capsys, "--out-dir", str(char_run[0]), "--start", prompt, "--num-samples", "1",
                         "--max-new-tokens", "20")  # fmt: skip
    assert code == 0, err
    assert texts(out)[0].startswith(prompt) and len(texts(out)[0]) == len(prompt) + 20


def test_prompt_problems_are_one_line(tmp_path, capsys, char_run):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    for start, message in [
        ("", "the prompt is empty after tokenization"),
        ("日本", "not in the vocabulary"),
        (f"FILE:{tmp_path / 'nothing.txt'}", "cannot read the prompt file"),
        (f"FILE:{tmp_path / 'latin1.txt'}", "is not UTF-8 text"),
    ]:
        assert message in refused(*run(capsys, "--out-dir", str(char_run[0]), "--start", start)[::2])


# --- 3. devices and dtypes


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_line(char_run):
    result = cli("--out-dir", str(char_run[0]), "--device", "cuda")
    line = refused(result.returncode, result.stderr)
    assert "--device cuda: this machine has no cuda device" in line and "--device cpu" in line


@pytest.mark.parametrize(
    "device, message",
    [("tpu", "'tpu' is not a device name"), ("meta", "runs on cpu, cuda (cuda:N) or mps"), ("cpu:1", "1 cpu device")],
)
def test_unknown_or_absent_devices_are_one_line(capsys, char_run, device, message):
    assert message in refused(*run(capsys, "--out-dir", str(char_run[0]), "--device", device)[::2])


def test_float16_on_cpu_samples(capsys, char_run):
    # PyTorch's CPU autocast computes in float16 (slowly), so there is nothing to refuse.
    code, out, err = run(capsys, "--out-dir", str(char_run[0]), "--dtype", "float16", "--start", "A",
                         "--num-samples", "1", "--max-new-tokens", "5")  # fmt: skip
    assert code == 0, err
    assert len(texts(out)[0]) == 6


def test_bfloat16_on_a_gpu_without_it_is_one_line(monkeypatch, capsys, char_run):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-16GB")
    line = refused(*run(capsys, "--out-dir", str(char_run[0]), "--device", "cuda", "--dtype", "bfloat16")[::2])
    assert line == "error: dtype bfloat16 is not supported by Tesla V100-SXM2-16GB; use --dtype=float16"


# --- 5. what --checkpoint may name


def test_checkpoint_may_be_a_ray_checkpoint_folder_a_ckpt_file_or_an_out_dir(tmp_path, capsys, char_run):
    out_dir, data_dir = char_run
    ray_checkpoint = tmp_path / "run" / "checkpoint_2026-01-02_03-04-05.000000"
    write_checkpoint(ray_checkpoint, data_dir)
    outputs = []
    for path in (ray_checkpoint, out_dir / "ckpt.pt", out_dir):
        code, out, err = run(capsys, "--checkpoint", str(path), "--num-samples", "1", "--max-new-tokens", "8")
        assert code == 0, err
        outputs.append(out)
    assert outputs[0] == outputs[1] == outputs[2]  # one model, one seed


def test_checkpoint_paths_without_a_checkpoint_are_one_line(tmp_path, capsys, char_run):
    line = refused(*run(capsys, "--checkpoint", str(tmp_path / "nothing"))[::2])
    assert line.startswith(f"error: no checkpoint at {tmp_path / 'nothing'}: pass a Ray checkpoint folder")
    (tmp_path / "empty").mkdir()
    line = refused(*run(capsys, "--checkpoint", str(tmp_path / "empty"))[::2])
    assert line.startswith(f"error: {tmp_path / 'empty'} holds no ckpt.pt")


def test_a_ray_run_folder_samples_its_latest_checkpoint(tmp_path, capsys, char_run):
    """storage_path/run_name, as raygpt.export and raygpt.eval take it: the checkpoint at the latest
    iteration (as a resume chooses), named on stderr; stdout holds only the samples."""
    older, newer = (tmp_path / "run" / f"checkpoint_2026-01-0{day}_00-00-00.000000" for day in (1, 2))
    for folder in (older, newer):
        write_checkpoint(folder, char_run[1])
    state = checkpoint.load(older / checkpoint.CKPT_NAME)
    checkpoint.save_atomic({**state, "iter_num": 5}, older / checkpoint.CKPT_NAME)  # the later iteration
    code, out, err = run(capsys, "--checkpoint", str(tmp_path / "run"), "--num-samples", "1", "--max-new-tokens", "8")
    assert code == 0, err
    assert f"{older} (iter 5) is the latest checkpoint of Ray run folder {tmp_path / 'run'}" in err
    assert out == run(capsys, "--checkpoint", str(older), "--num-samples", "1", "--max-new-tokens", "8")[1]


def test_damaged_checkpoints_are_one_line(tmp_path, capsys, char_run):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "ckpt.pt").write_bytes(b"not a checkpoint")
    assert "damaged or truncated" in refused(*run(capsys, "--checkpoint", str(tmp_path / "junk"))[::2])
    state = checkpoint.load(char_run[0] / "ckpt.pt")
    state["model_args"]["n_embd"] = 32
    checkpoint.save_atomic(state, tmp_path / "wider.pt")
    line = refused(*run(capsys, "--checkpoint", str(tmp_path / "wider.pt"))[::2])
    assert "its weights do not fit its model_args: size mismatch for transformer.wte.weight" in line


# --- 4. help


def test_help_has_a_usage_line_a_description_and_every_option_with_its_default():
    result = cli("--help")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("usage: python -m raygpt.sample [--out-dir DIR | --checkpoint PATH")
    assert "Sample text from a trained GPT" in result.stdout and "examples:" in result.stdout
    for action in sample.build_parser()._actions:
        if action.dest == "help":
            continue
        assert action.help and "(default: " in action.help, action.dest
        assert action.option_strings[0] in result.stdout
    assert "(default: 0.8)" in result.stdout and "(default: '\\n')" in result.stdout


def test_nanogpt_sample_py_spellings_work_as_typed(tmp_path, capsys):
    """nanoGPT's `python sample.py --out_dir=... --num_samples=2 --max_new_tokens=40 --compile=False`."""
    write_meta(tmp_path / "data" / "tiny_char")
    write_checkpoint(tmp_path / "out", tmp_path / "data")
    common = ("--start=KING:", "--temperature=0", "--seed=3")
    code, ours, err = run(capsys, "--out-dir", str(tmp_path / "out"), "--num-samples", "2", "--max-new-tokens",
                          "40", *common)  # fmt: skip
    assert code == 0, err
    code, theirs, err = run(capsys, f"--out_dir={tmp_path / 'out'}", "--num_samples=2", "--max_new_tokens=40",
                            "--compile=False", "--init_from=resume", *common)  # fmt: skip
    assert code == 0, err
    assert texts(theirs) == texts(ours) and len(texts(ours)) == 2
    parser = sample.build_parser()
    assert sample.nanogpt_spelling(["--compile=True", "--top_k=5"], parser) == ["--compile", "--top-k=5"]
    with pytest.raises(SystemExit):  # still refused: not an option under either spelling
        parser.parse_args(sample.nanogpt_spelling(["--no_such_option=1"], parser))


# --- 6. round three of bad input: one line, exit 2, nothing printed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
        (["--seed", str(2**64)], f"--seed must be in [0, 2**32), got {2**64}"),
        (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
        (["--top-k", "many"], "argument --top-k: invalid int value: 'many'"),
        (["--start", "FILE:"], "--start FILE: names no file"),
        (["--start", "caf\udce9"], "--start is not UTF-8 text (character 3)"),  # b'caf\xe9' from a shell
    ],
)
def test_more_values_no_sampling_can_use_are_one_line(capsys, char_run, args, message):
    try:
        code, out, err = run(capsys, "--out-dir", str(char_run[0]), "--num-samples", "1", *args)
    except SystemExit as e:  # argparse's refusal, now one line too
        code, (out, err) = e.code, capsys.readouterr()
    assert message in refused(code, err) and out == ""


def test_a_temperature_that_overflows_is_refused_in_one_line_after_the_thread_line(capsys, char_run):
    """Found only as the first token is sampled: the thread line, said as sampling began, comes first."""
    code, out, err = run(capsys, "--out-dir", str(char_run[0]), "--num-samples", "1", "--temperature", "1e-300")
    thread_line, error = err.strip().splitlines()
    assert code == 2 and out == "" and thread_line.startswith("cpu: ")
    assert error.startswith("error: --temperature 1e-300: the model's scores divided by it overflow float32")


@pytest.mark.parametrize("encoding", ["utf-16-le", "binary"])
def test_a_utf16_or_binary_prompt_file_is_named_as_such(tmp_path, capsys, char_run, encoding):
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes("ROMEO:".encode("utf-16-le") if encoding == "utf-16-le" else b"ROMEO\0\0\x01:")
    line = refused(*run(capsys, "--out-dir", str(char_run[0]), "--start", f"FILE:{prompt}")[::2])
    assert line == f"error: the prompt file {prompt} holds NUL characters: it is binary or UTF-16, not UTF-8 text"


def test_a_byte_order_mark_is_not_part_of_a_prompt_file(tmp_path, capsys, char_run):
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"\xef\xbb\xbfROMEO:")
    code, out, err = run(capsys, "--out-dir", str(char_run[0]), "--start", f"FILE:{prompt}", "--num-samples", "1",
                         "--max-new-tokens", "4")  # fmt: skip
    assert code == 0, err
    assert texts(out)[0].startswith("ROMEO:") and len(texts(out)[0]) == 10


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_with_non_finite_weights_is_refused_before_sampling(tmp_path, capsys, char_run, value):
    state = checkpoint.load(char_run[0] / "ckpt.pt")
    state["model"]["_orig_mod.transformer.h.0.mlp.c_fc.weight"][0, 0] = value
    checkpoint.save_atomic(state, tmp_path / "diverged.pt")
    code, out, err = run(
        capsys, "--checkpoint", str(tmp_path / "diverged.pt"), "--meta", str(char_run[1] / "tiny_char")
    )
    line = refused(code, err)
    assert line.endswith(
        "weight transformer.h.0.mlp.c_fc.weight holds nan or inf values; sample from an earlier checkpoint"
    )
    assert out == ""


# --- 7. raygpt.export's outputs, checked before the checkpoint is read (it reads the same checkpoints)


@pytest.mark.parametrize(
    "outputs, message",
    [
        (
            ["--ckpt", "{tmp}/afolder"],
            "--ckpt {tmp}/afolder is a folder; give a file path such as {tmp}/afolder/ckpt.pt",
        ),
        (["--ckpt", "{tmp}/afile/x.pt"], "--ckpt {tmp}/afile/x.pt: {tmp}/afile is a file, not a folder"),
        (["--hf", "{tmp}/afile"], "--hf {tmp}/afile is a file, not a folder"),
        (["--hf", "{tmp}/afile/hf"], "--hf {tmp}/afile/hf: {tmp}/afile is a file, not a folder"),
        (["--ckpt", ""], "--ckpt '': give a local file path"),
        (["--hf", "s3://bucket/hf"], "--hf 's3://bucket/hf': give a local folder path"),
        (["--ckpt", "{tmp}/hf/config.json", "--hf", "{tmp}/hf"], "is --hf {tmp}/hf or one of its files"),
        (["--ckpt", "{tmp}/out.pt", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_export_outputs_that_cannot_be_written_are_one_line(tmp_path, capsys, char_run, outputs, message):
    from raygpt import export

    (tmp_path / "afolder").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    before = sorted(tmp_path.rglob("*"))
    try:
        code = export.main([str(char_run[0]), *(arg.format(tmp=tmp_path) for arg in outputs)])
    except SystemExit as e:  # argparse's refusal
        code = e.code
    assert message.format(tmp=tmp_path) in refused(code, capsys.readouterr().err)
    assert sorted(tmp_path.rglob("*")) == before


def test_export_makes_the_folders_its_outputs_need(tmp_path, capsys, char_run):
    from raygpt import export

    ckpt, hf = tmp_path / "new" / "deep" / "ckpt.pt", tmp_path / "new" / "hf"
    assert export.main([str(char_run[0]), "--ckpt", str(ckpt), "--hf", str(hf)]) == 0, capsys.readouterr().err
    assert ckpt.is_file() and sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]


# --- 7. CPU threads and progress: stderr says how many threads and how each text went; stdout holds the texts


def test_sample_says_its_threads_and_each_texts_time_on_stderr(char_run):
    out_dir, _ = char_run
    one_core = {min(os.sched_getaffinity(0))}
    done = subprocess.run([sys.executable, "-m", "raygpt.sample", "--out-dir", str(out_dir), "--device", "cpu",
                           "--num-samples", "2", "--max-new-tokens", "8", "--start", "A"], capture_output=True,
                          text=True, timeout=120, preexec_fn=lambda: os.sched_setaffinity(0, one_core))  # fmt: skip
    assert done.returncode == 0, done.stderr
    first, *progress = done.stderr.splitlines()
    assert first == "cpu: 1 thread (of 1 core; --threads N to change)"
    assert [re.sub(r"in [\d.]+ s \([\d,.]+ tokens/s\)", "in S", line) for line in progress] == [
        "sample 1/2: 8 tokens in S",
        "sample 2/2: 8 tokens in S",
    ]
    assert [len(text) for text in texts(done.stdout)] == [9, 9]  # the prompt and 8 characters: nothing else


def test_sample_runs_on_the_threads_asked_and_leaves_torch_as_found(capsys, char_run, monkeypatch):
    seen = []
    original = sample.generate
    monkeypatch.setattr(sample, "generate", lambda *args: seen.append(torch.get_num_threads()) or original(*args))
    before = torch.get_num_threads()
    threads = 2 if before != 2 else 3
    code, out, err = run(capsys, "--out-dir", str(char_run[0]), "--num-samples", "1", "--max-new-tokens", "4",
                         "--threads", str(threads))  # fmt: skip
    assert code == 0 and seen == [threads] and torch.get_num_threads() == before
    assert err.splitlines()[0] == f"cpu: {threads} threads (of {len(os.sched_getaffinity(0))} cores; set by --threads)"
    assert len(texts(out)) == 1


def test_threads_below_one_are_refused(capsys, char_run):
    code, _, err = run(capsys, "--out-dir", str(char_run[0]), "--threads", "0")
    assert refused(code, err) == "error: --threads must be at least 1, got 0"


def test_a_reader_that_stops_early_ends_sample_quietly(char_run):
    """`raygpt.sample ... | head -1`: the closed pipe ends the samples without a traceback."""
    out_dir, _ = char_run
    command = [sys.executable, "-m", "raygpt.sample", "--out-dir", str(out_dir), "--num-samples", "50",
               "--max-new-tokens", "200", "--device", "cpu", "--threads", "1"]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        process.stdout.readline()
        process.stdout.close()  # as head does after its line
        err = process.stderr.read().decode()
        code = process.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert code == 141
