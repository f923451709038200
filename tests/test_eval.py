"""raygpt.eval and core/evals.py: multiple-choice scoring against transformers' GPT-2 and against numbers
worked out by hand, bits per byte by hand, the command line, and what it refuses. Fast tier: tiny models
on the CPU, no Ray."""

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from raygpt import eval as eval_cli
from raygpt.core import checkpoint, evals
from raygpt.core.model import GPT, GPTConfig
from raygpt.core.tokenizer import EOT_TOKEN, PADDED_GPT2_VOCAB_SIZE, Tokenizer, gpt2_encoding

BLOCK_SIZE = 32

# HellaSwag-shaped examples: endings of very different lengths (so that the lowest sum and the lowest mean
# part ways), two to five endings, and one context longer than BLOCK_SIZE tokens.
EXAMPLES = [
    {"ctx": "A man is sitting on a roof. he", "label": 3, "endings": [
        "is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
        "starts pulling up roofing on a roof."]},
    {"ctx": "A woman is outside with a bucket and a dog. The dog", "label": 0, "endings": [
        "runs.", "is running around trying to avoid a bath, while the woman chases it across the yard.",
        "gets into a bath tub with the dog.", "gets the dog wet, then it runs away again."]},
    {"ctx": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter "
            "clothes smiles. then", "label": 1, "endings": [
        ", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two men "
        "supporting the head of the person wearing winter clothes snow as the we girls sled.", ", the man puts on "
        "a christmas coat, knitted with netting.", ", the man continues removing the snow on his car."]},
    {"ctx": "How to make tea. Boil", "label": 1, "endings": ["water.", "the kettle, then pour it over the leaves."]},
    {"ctx": "The cat sat on the", "label": 4, "endings": ["mat.", "dog", "roof of the old red barn at dawn.", "sofa.",
                                                         "windowsill, watching the birds."]},
]  # fmt: skip


def write_jsonl(path, examples):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(example) + "\n" for example in examples))
    return path


def tiny_gpt(vocab_size=PADDED_GPT2_VOCAB_SIZE, block_size=BLOCK_SIZE, seed=0) -> tuple[GPT, dict]:
    """A 2-layer GPT with weights far from the init's small ones, so its endings' losses differ clearly."""
    torch.manual_seed(seed)
    model_args = dict(n_layer=2, n_head=2, n_embd=16, block_size=block_size, bias=True, vocab_size=vocab_size)
    model = GPT(GPTConfig(**model_args, dropout=0.0))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return model.eval(), model_args


def write_checkpoint(path, model: GPT, model_args: dict, config: dict | None = None):
    """model as training writes it into a ckpt.pt (compiled key names, its config)."""
    state = {
        "model": {"_orig_mod." + key: value for key, value in model.state_dict().items()},
        "model_args": model_args,
        "iter_num": 1,
        "config": config or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save_atomic(state, path)
    return path


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "raygpt.eval", *args, "--device", "cpu"], capture_output=True, text=True, timeout=120
    )


def run(capsys, *args):
    """eval.main in this process: (exit status, stdout, stderr)."""
    try:
        code = eval_cli.main([*args, "--device", "cpu"])
    except SystemExit as e:  # argparse's refusals exit from parse_args
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def refused(code, err) -> str:
    """The one `error: ...` line of a refusal."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# --- 1. the scorer against transformers' GPT2LMHeadModel, through raygpt.export's Hugging Face folder


def reference_losses(hf_model, example: dict, block_size: int) -> list[float]:
    """Each ending's summed cross-entropy, as llm.c's hellaswag.py defines it, worked out here on its own:
    context and " " + ending tokenized apart, the row cut to its last block_size + 1 tokens."""
    encoding = gpt2_encoding()
    context = encoding.encode(example["ctx"])
    losses = []
    for ending in example["endings"]:
        ending_tokens = encoding.encode(" " + ending)
        row = torch.tensor((context + ending_tokens)[-(block_size + 1) :])
        with torch.no_grad():
            log_probs = torch.log_softmax(hf_model(row[None, :-1]).logits[0].double(), dim=-1)
        predicted = log_probs[-len(ending_tokens) :].gather(1, row[-len(ending_tokens) :, None])
        losses.append(-predicted.sum().item())
    return losses


def test_scores_match_transformers_gpt2_on_the_exported_model(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from raygpt import export

    model, model_args = tiny_gpt()
    ckpt = write_checkpoint(tmp_path / "out" / "ckpt.pt", model, model_args)
    assert export.main([str(ckpt), "--hf", str(tmp_path / "hf")]) == 0
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()

    expected = [reference_losses(hf_model, example, BLOCK_SIZE) for example in EXAMPLES]
    by_sum = [min(range(len(sums)), key=sums.__getitem__) for sums in expected]
    by_mean = []
    for example, sums in zip(EXAMPLES, expected):
        lengths = [len(gpt2_encoding().encode(" " + ending)) for ending in example["endings"]]
        means = [total / n for total, n in zip(sums, lengths)]
        by_mean.append(min(range(len(means)), key=means.__getitem__))
    assert by_sum != by_mean  # the two metrics are told apart here
    labels = [example["label"] for example in EXAMPLES]

    capsys.readouterr()
    code, out, err = run(capsys, str(write_jsonl(tmp_path / "mc.jsonl", EXAMPLES)), "--checkpoint", str(ckpt), "--json")
    assert code == 0, err
    scores = json.loads(out)
    assert scores["correct"] == sum(p == label for p, label in zip(by_sum, labels))
    assert scores["correct_norm"] == sum(p == label for p, label in zip(by_mean, labels))
    assert scores["examples"] == len(EXAMPLES) and scores["truncated"] == 1
    assert scores["acc"] == scores["correct"] / len(EXAMPLES)

    examples = evals.read_examples(tmp_path / "mc.jsonl")
    encoded = evals.encode_examples(examples, Tokenizer(None), BLOCK_SIZE, PADDED_GPT2_VOCAB_SIZE)
    ours = evals.ending_losses(model, encoded, "float32", batch_size=3)  # batches that split examples
    for got, want in zip(ours, expected):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


# --- 2. a model whose probabilities are set by hand


class Bigram(torch.nn.Module):
    """The next token's probabilities are a fixed row of `probs` for the current token."""

    def __init__(self, probs, block_size=8):
        super().__init__()
        self.log_probs = torch.nn.Parameter(torch.tensor(probs, dtype=torch.float64).log().float())
        self.config = SimpleNamespace(block_size=block_size, vocab_size=len(probs))

    def hidden_states(self, idx):  # what the scorer asks of a GPT: the state lm_head reads, at each position
        return torch.nn.functional.one_hot(idx, self.config.vocab_size).float()

    def lm_head(self, hidden):
        return hidden @ self.log_probs


# Characters " ", "a", "b", "c"; row: the current character, column: the next one.
HAND_PROBS = [
    [0.05, 0.45, 0.10, 0.40],  # after " ": a 0.45, b 0.1, c 0.4
    [0.50, 0.20, 0.20, 0.10],  # after "a": " " 0.5
    [0.70, 0.10, 0.10, 0.10],  # after "b": " " 0.7
    [0.30, 0.30, 0.30, 0.10],  # after "c": c 0.1
]
HAND_CHARS = [" ", "a", "b", "c"]


def test_two_examples_scored_by_hand(tmp_path):
    """Example 1: ending " b" costs -ln .5 - ln .1 (sum 3.00, mean 1.50), " cc" -ln .5 - ln .4 - ln .1
    (sum 3.91, mean 1.30): acc picks " b", acc_norm " cc", the label. Example 2: " a" is the likeliest
    after "b ", by sum and mean."""
    path = write_jsonl(tmp_path / "hand.jsonl", [
        {"ctx": "a", "endings": ["b", "cc"], "label": 1},
        {"ctx": "b", "endings": ["a", "b", "c"], "label": 0},
    ])  # fmt: skip
    examples = evals.read_examples(path)
    encoded = evals.encode_examples(examples, Tokenizer(HAND_CHARS), 8, 4)
    losses = evals.ending_losses(Bigram(HAND_PROBS), encoded, "float32")
    ln = math.log
    assert losses[0] == pytest.approx([-ln(0.5) - ln(0.1), -ln(0.5) - ln(0.4) - ln(0.1)], rel=1e-6)
    assert losses[1] == pytest.approx([-ln(0.7) - ln(0.45), -ln(0.7) - ln(0.1), -ln(0.7) - ln(0.4)], rel=1e-6)
    metrics = evals.choice_metrics(encoded, losses)
    assert (metrics["correct"], metrics["correct_norm"], metrics["examples"]) == (1, 2, 2)
    assert (metrics["acc"], metrics["acc_norm"], metrics["truncated"]) == (0.5, 1.0, 0)


def test_a_long_context_is_cut_from_the_left_keeping_the_ending(tmp_path):
    """block_size 4: "abcab" + " cc" is 8 tokens, cut to its last 5 ("ab cc"), "abcab" + " a" to "cab a";
    the bigram's losses depend on the previous token only, so they are the uncut ones."""
    examples = [evals.Example("abcab", ("cc", "a"), 0, "x:1")]
    encoded = evals.encode_examples(examples, Tokenizer(HAND_CHARS), 4, 4)
    assert encoded[0].rows == ((1, 2, 0, 3, 3), (3, 1, 2, 0, 1)) and encoded[0].truncated
    assert encoded[0].ending_lengths == (3, 2)
    losses = evals.ending_losses(Bigram(HAND_PROBS, block_size=4), encoded, "float32")
    ln = math.log
    assert losses[0] == pytest.approx([-ln(0.7) - ln(0.4) - ln(0.1), -ln(0.7) - ln(0.45)], rel=1e-6)


def test_an_ending_longer_than_the_context_window_is_refused():
    examples = [evals.Example("a", ("abcabc", "a"), 0, "f.jsonl:3")]
    with pytest.raises(evals.EvalError, match=r"f.jsonl:3: ending 0 is 7 tokens, more than the model's block_size 4"):
        evals.encode_examples(examples, Tokenizer(HAND_CHARS), 4, 4)


def test_the_model_is_left_in_the_mode_it_was_in():
    model = Bigram(HAND_PROBS).train()
    encoded = evals.encode_examples([evals.Example("a", ("b", "c"), 0, "x:1")], Tokenizer(HAND_CHARS), 8, 4)
    evals.ending_losses(model, encoded)
    assert model.training


# --- 3. bits per byte


def test_bits_per_byte_of_a_char_dataset_by_hand():
    """Characters of 1 and 2 UTF-8 bytes; block_size 4 over 11 tokens: windows [0, 5), [4, 9), [8, 11),
    each token but the first predicted once."""
    chars = ["\n", "a", "é"]
    probs = [[0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.4, 0.4, 0.2]]
    tokens = np.array([1, 2, 0, 1, 1, 2, 2, 0, 1, 2, 0], dtype=np.uint16)
    assert evals.bpb_windows(len(tokens), 4) == [(0, 5), (4, 9), (8, 11)]
    byte_lengths = evals.token_byte_lengths(Tokenizer(chars), 3)
    assert byte_lengths.tolist() == [1, 1, 2]
    result = evals.bits_per_byte(Bigram(probs, block_size=4), tokens, byte_lengths, "float32", batch_size=2)
    nats = -sum(math.log(probs[a][b]) for a, b in zip(tokens[:-1], tokens[1:]))
    n_bytes = sum(len(chars[t].encode()) for t in tokens[1:])
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-6)
    assert (result["tokens"], result["bytes"], result["windows"]) == (10, n_bytes, 3)
    assert result["loss"] == pytest.approx(nats / 10, rel=1e-6)
    limited = evals.bits_per_byte(Bigram(probs, block_size=4), tokens, byte_lengths, "float32", limit=1)
    assert (limited["tokens"], limited["windows"]) == (4, 1)


class Unigram(torch.nn.Module):
    """The same probabilities for the next token whatever came before."""

    def __init__(self, vocab_size, block_size=8):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(vocab_size, generator=torch.Generator().manual_seed(0)))
        self.config = SimpleNamespace(block_size=block_size, vocab_size=vocab_size)

    def hidden_states(self, idx):
        return torch.zeros(*idx.shape, 1)

    def lm_head(self, hidden):
        return self.logits.expand(*hidden.shape[:-1], -1)


def test_bits_per_byte_of_gpt2_tokens_leaves_out_endoftext():
    encoding = gpt2_encoding()
    text, more = "Héllo wörld, naïve café", " again"
    tokens = np.array(encoding.encode(text) + [EOT_TOKEN] + encoding.encode(more), dtype=np.uint16)
    byte_lengths = evals.token_byte_lengths(Tokenizer(None), PADDED_GPT2_VOCAB_SIZE)
    assert byte_lengths[EOT_TOKEN] == 0 and byte_lengths[50257:].sum() == 0
    model = Unigram(PADDED_GPT2_VOCAB_SIZE)
    result = evals.bits_per_byte(model, tokens, byte_lengths, "float32")
    log_probs = torch.log_softmax(model.logits.detach().double(), dim=0)
    predicted = [int(t) for t in tokens[1:] if t != EOT_TOKEN]
    n_bytes = len(text.encode()) + len(more.encode()) - len(encoding.decode_single_token_bytes(int(tokens[0])))
    assert (result["tokens"], result["bytes"]) == (len(predicted), n_bytes)
    expected = -sum(log_probs[t].item() for t in predicted) / math.log(2) / n_bytes
    assert result["bits_per_byte"] == pytest.approx(expected, rel=1e-5)


def write_char_dataset(folder, chars, text, split=0.5):
    """A char dataset as raygpt.prepare lays it out: train.bin, val.bin, meta.json."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.array([chars.index(c) for c in text], dtype=np.uint16)
    cut = int(len(ids) * split)
    ids[:cut].tofile(folder / "train.bin")
    ids[cut:].tofile(folder / "val.bin")
    meta = {"vocab_size": len(chars), "tokenizer": "char", "chars": chars, "dtype": "uint16"}
    (folder / "meta.json").write_text(json.dumps(meta))
    return ids[cut:]


CHARS = sorted(set("\n !',.:;?-" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "abcdefghijklmnopqrstuvwxyz"))


@pytest.fixture
def char_run(tmp_path, shakespeare_path):
    """(model, ckpt.pt, dataset folder, val tokens): a tiny char model trained (in name) on its own dataset."""
    text = "".join(c for c in shakespeare_path.read_text()[:3000] if c in CHARS)
    val = write_char_dataset(tmp_path / "data" / "tiny_char", CHARS, text)
    model, model_args = tiny_gpt(vocab_size=len(CHARS), block_size=16)
    config = {"data_dir": str(tmp_path / "data"), "dataset": "tiny_char"}
    ckpt = write_checkpoint(tmp_path / "out" / "ckpt.pt", model, model_args, config)
    return model, ckpt, tmp_path / "data" / "tiny_char", val


def test_bpb_cli_scores_the_dataset_the_model_was_trained_on(char_run):
    model, ckpt, folder, val = char_run
    result = cli("bpb", "--checkpoint", str(ckpt), "--json", "--batch-size", "7")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    # Worked out here: every window through the model, each target's loss from the model's own logits.
    nats = 0.0
    for start in range(0, len(val) - 1, 16):
        window = torch.tensor(val[start : start + 17].astype(np.int64))
        with torch.no_grad():
            logits, _ = model(window[None, :-1], window[None, 1:])
        nats += torch.nn.functional.cross_entropy(logits[0].double(), window[1:], reduction="sum").item()
    assert scores["tokens"] == scores["bytes"] == len(val) - 1  # ASCII: a byte a character
    assert scores["bits_per_byte"] == pytest.approx(nats / math.log(2) / (len(val) - 1), rel=1e-5)
    assert scores["data"] == str(folder) and scores["windows"] == math.ceil((len(val) - 1) / 16)
    assert "bpb: " in result.stderr and str(folder / "val.bin") in result.stderr


# --- 4. the command line


def test_hellaswag_from_a_local_copy_prints_one_result_line(tmp_path):
    model, model_args = tiny_gpt()
    write_checkpoint(tmp_path / "out" / "ckpt.pt", model, model_args)
    local = write_jsonl(tmp_path / "hellaswag_val.jsonl", EXAMPLES)
    result = cli("hellaswag", "--input", str(local), "--out-dir", str(tmp_path / "out"), "--limit", "2")
    assert result.returncode == 0, result.stderr
    expected = evals.evaluate_multiple_choice(model, Tokenizer(None), evals.read_examples(local, limit=2), "float32")
    line = f"hellaswag: acc {expected['acc']:.4f} ({expected['correct']}/2), acc_norm {expected['acc_norm']:.4f}"
    assert result.stdout.startswith(line) and len(result.stdout.splitlines()) == 1
    assert "hellaswag: scoring 2 examples (8 endings) on cpu (float32)" in result.stderr
    assert "note:" not in result.stderr  # neither example is longer than BLOCK_SIZE


def test_a_context_past_block_size_is_one_note_not_an_error(tmp_path, capsys):
    model, model_args = tiny_gpt()
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", model, model_args)
    path = write_jsonl(tmp_path / "mc.jsonl", EXAMPLES)
    code, out, err = run(capsys, str(path), "--checkpoint", str(ckpt))
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "1 of 5 examples" in notes[0] and "truncated from the left" in notes[0]
    assert out.startswith("mc.jsonl: acc ")


def test_the_download_is_cached_and_an_offline_one_is_refused(tmp_path, capsys, monkeypatch):
    model, model_args = tiny_gpt()
    ckpt = str(write_checkpoint(tmp_path / "ckpt.pt", model, model_args))
    monkeypatch.setattr(eval_cli, "HELLASWAG_URL", "http://127.0.0.1:9/hellaswag_val.jsonl")  # nothing listens
    code, _, err = run(capsys, "hellaswag", "--checkpoint", ckpt, "--cache-dir", str(tmp_path / "cache"))
    assert code == 2 and err.splitlines()[0].startswith("downloading HellaSwag's val split from http://127.0.0.1:9/")
    assert refused(code, err.split("\n", 1)[1]).startswith("error: cannot download HellaSwag (")
    assert "pass a local copy of hellaswag_val.jsonl with --input FILE" in err
    assert not (tmp_path / "cache").exists()  # nothing half-written is left to be taken for the file
    write_jsonl(tmp_path / "cache" / "hellaswag_val.jsonl", EXAMPLES[:1])  # as a download leaves it
    code, out, err = run(capsys, "hellaswag", "--checkpoint", ckpt, "--cache-dir", str(tmp_path / "cache"))
    assert code == 0 and out.startswith("hellaswag: acc ") and "downloading" not in err


@pytest.fixture
def served(tmp_path):
    """A real HTTP server on loopback that serves the bytes put in `served.body`; yields it with its url."""
    import http.server
    import threading

    class Reply(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(server.body)))
            self.end_headers()
            self.wfile.write(server.body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Reply)
    server.body, server.url = b"", f"http://127.0.0.1:{server.server_address[1]}/hellaswag_val.jsonl"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_only_the_whole_val_split_is_cached(tmp_path, capsys, monkeypatch, served):
    """A proxy's page or a cut-short file is refused in one line and not cached; the whole split is."""
    from raygpt.prep.hellaswag import HELLASWAG_VAL_EXAMPLES, cached_hellaswag

    model, model_args = tiny_gpt()
    ckpt = str(write_checkpoint(tmp_path / "ckpt.pt", model, model_args))
    cache = tmp_path / "cache"
    monkeypatch.setattr(eval_cli, "HELLASWAG_URL", served.url)
    served.body = b"<html><body>Please sign in to the network</body></html>\n"
    code, _, err = run(capsys, "hellaswag", "--checkpoint", ckpt, "--cache-dir", str(cache))
    line = refused(code, err.split("\n", 1)[1])
    assert line.startswith(f"error: the download from {served.url} is not HellaSwag's val split (line 1: not valid")
    assert line.endswith("nothing was cached: pass a local copy of hellaswag_val.jsonl with --input FILE")
    assert not cache.exists()
    lines = [json.dumps(EXAMPLES[i % len(EXAMPLES)]) for i in range(HELLASWAG_VAL_EXAMPLES)]
    served.body = "\n".join(lines[:-1]).encode()
    with pytest.raises(evals.EvalError, match=f"\\(10041 examples, not the val split's {HELLASWAG_VAL_EXAMPLES}\\)"):
        cached_hellaswag(cache, "--input FILE", served.url)
    assert not cache.exists()
    served.body = "\n".join(lines).encode()
    assert cached_hellaswag(cache, "--input FILE", served.url).read_bytes() == served.body


# --- 5. what is refused, in one line each


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"ctx": "a", "endings": ["b", "c"], "label": 0', "mc.jsonl:2: not valid JSON"),
        ('["a", "b"]', "mc.jsonl:2: expected a JSON object with ctx, endings and label, got list"),
        ('{"ctx": "a", "endings": ["b", "c"], "label": 2}', "mc.jsonl:2: label 2 is out of range: the example has 2"),
        ('{"ctx": "a", "endings": ["b", "c"], "label": -1}', "mc.jsonl:2: label -1 is out of range"),
        ('{"ctx": "a", "endings": ["b", "c"], "label": true}', "mc.jsonl:2: label must be an integer"),
        ('{"ctx": "a", "endings": ["b", "c"]}', "mc.jsonl:2: no label (HellaSwag's test split has none"),
        ('{"ctx": "a", "endings": ["b", " "], "label": 0}', "mc.jsonl:2: ending 1 is empty"),
        ('{"ctx": "a", "endings": ["b"], "label": 0}', "mc.jsonl:2: endings must be a list of two or more strings"),
        ('{"ctx": "", "endings": ["b", "c"], "label": 0}', "mc.jsonl:2: ctx must be a string with some text"),
    ],
)
def test_bad_examples_are_refused_naming_file_and_line(tmp_path, capsys, line, message):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"ctx": "a", "endings": ["b", "c"], "label": "1"}\n' + line + "\n")
    refusal = refused(*run(capsys, str(path), "--checkpoint", str(tmp_path / "never-read"))[::2])
    assert refusal.startswith(f"error: {tmp_path}/{message}"), refusal


def test_a_char_model_refuses_text_it_has_no_characters_for(tmp_path, capsys, char_run):
    _, ckpt, _, _ = char_run
    path = write_jsonl(tmp_path / "mc.jsonl", [{"ctx": "Über alles", "endings": ["a", "b"], "label": 0}])
    line = refused(*run(capsys, str(path), "--checkpoint", str(ckpt))[::2])
    assert f"{path}:1: ctx has characters not in the vocabulary: 'Ü'" in line and "character-level model" in line


def test_token_ids_past_the_models_vocabulary_are_refused(tmp_path, capsys):
    """GPT-2 weights of a 100-token vocabulary read GPT-2 BPE, whose ids go past it."""
    from raygpt.export import export_hf

    model, model_args = tiny_gpt(vocab_size=100)
    export_hf(model.state_dict(), model_args, tmp_path / "hf")
    path = write_jsonl(tmp_path / "mc.jsonl", [{"ctx": "Hello there", "endings": ["a", "b"], "label": 0}])
    line = refused(*run(capsys, str(path), "--init-from", str(tmp_path / "hf"))[::2])
    assert f"{path}:1: ctx has token id" in line and "the model's vocabulary has 100 tokens" in line


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.jsonl"], "no file missing.jsonl: TASK is hellaswag, bpb or a jsonl file"),
        (["bpb", "--limit", "0", "--batch-size", "0"], "--limit must be at least 1, got 0; --batch-size must be"),
        (["bpb", "--input", "x.jsonl"], "--input is hellaswag's local copy"),
        (["hellaswag", "--data", "d"], "--data is the dataset bpb scores"),
        (["bpb", "--init-from", "gpt2", "--meta", "m"], "--checkpoint and --meta are for --init-from resume"),
        (["bpb", "--dtype", "float64"], "argument --dtype: invalid choice"),
    ],
)
def test_options_no_evaluation_can_use_are_refused(capsys, args, message):
    assert message in refused(*run(capsys, *args)[::2])


def test_bpb_needs_a_dataset_and_its_val_split(tmp_path, capsys):
    model, model_args = tiny_gpt()
    ckpt = str(write_checkpoint(tmp_path / "ckpt.pt", model, model_args))
    assert "pass the one to score with --data DIR" in refused(*run(capsys, "bpb", "--checkpoint", ckpt)[::2])
    (tmp_path / "empty").mkdir()
    line = refused(*run(capsys, "bpb", "--checkpoint", ckpt, "--data", str(tmp_path / "empty"))[::2])
    assert f"{tmp_path / 'empty' / 'val.bin'} not found" in line


def test_bpb_refuses_token_ids_the_model_lacks(tmp_path, capsys, char_run):
    _, ckpt, _, _ = char_run
    other = tmp_path / "other"
    other.mkdir()
    np.array([1, 2, 3, 70, 4], dtype=np.uint16).tofile(other / "val.bin")  # no meta.json: ids the model has not
    code, _, err = run(capsys, "bpb", "--checkpoint", str(ckpt), "--data", str(other))
    assert err.startswith(f"bpb: scoring {other / 'val.bin'} (5 tokens, windows of 16) on cpu (float32)\n")
    line = refused(code, err.split("\n", 1)[1])  # the error comes as the window holding the id is read
    assert f"{other / 'val.bin'}: token 3 is id 70, but the model's vocabulary has {len(CHARS)} tokens" in line


def test_gpt2_weights_refuse_a_char_dataset(tmp_path, capsys, char_run):
    from raygpt.export import export_hf

    _, _, folder, _ = char_run
    model, model_args = tiny_gpt(vocab_size=100)
    export_hf(model.state_dict(), model_args, tmp_path / "hf")
    line = refused(*run(capsys, "bpb", "--init-from", str(tmp_path / "hf"), "--data", str(folder))[::2])
    assert f"{folder} holds a char dataset, but GPT-2's weights read GPT-2 BPE tokens" in line
