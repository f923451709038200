"""Data preparation on the real corpus and on real parquet/text files; tokenizer metadata loading."""

import pickle
import subprocess
import sys
import time

import numpy as np
import pytest

from raygpt.core.tokenizer import EOT_TOKEN, Tokenizer, gpt2_encoding, load_meta
from raygpt.prep.corpus import prepare_corpus
from raygpt.prep.dataset import prepare_dataset
from raygpt.prep.output import PrepareError
from raygpt.prep.shakespeare import prepare_shakespeare_char


def test_shakespeare_char_matches_nanogpt(tmp_path, shakespeare_path):
    dataset = prepare_shakespeare_char(tmp_path, shakespeare_path)
    train = np.fromfile(dataset / "train.bin", dtype=np.uint16)
    val = np.fromfile(dataset / "val.bin", dtype=np.uint16)
    meta = load_meta(dataset)
    assert (meta["vocab_size"], len(train), len(val)) == (65, 1_003_854, 111_540)
    text = shakespeare_path.read_text()
    assert Tokenizer.from_meta(meta).decode(val[:1000].tolist()) == text[1_003_854:1_004_854]


def test_shakespeare_bpe_matches_nanogpt(tmp_path, shakespeare_path):
    dataset = prepare_dataset("shakespeare", tmp_path, shakespeare_path)
    sizes = [(dataset / f"{split}.bin").stat().st_size // 2 for split in ("train", "val")]
    assert sizes == [301_966, 36_059]
    assert load_meta(dataset) == {"vocab_size": 50257, "tokenizer": "gpt2"}


def make_parquet_corpus(directory, n_files=3, docs_per_file=200):
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir()
    docs = []
    rng = np.random.default_rng(0)
    words = ["the", "king", "doth", "speak", "héllo", "world", "😀", "\n"]
    for i in range(n_files):
        batch = [" ".join(rng.choice(words, size=rng.integers(1, 40))) for _ in range(docs_per_file)]
        docs += batch
        pq.write_table(pa.table({"text": batch, "id": list(range(docs_per_file))}), directory / f"part{i}.parquet")
    return docs


def test_parquet_corpus_is_tokenized_with_eot_and_split_deterministically(tmp_path):
    docs = make_parquet_corpus(tmp_path / "in")
    first = prepare_corpus("owt", tmp_path / "a", str(tmp_path / "in" / "*.parquet"), val_fraction=0.05, num_threads=2)
    second = prepare_corpus("owt", tmp_path / "b", str(tmp_path / "in" / "*.parquet"), val_fraction=0.05, num_threads=1)
    encoding = gpt2_encoding()
    expected_total = sum(len(encoding.encode_ordinary(doc)) + 1 for doc in docs)
    train = np.fromfile(first / "train.bin", dtype=np.uint16)
    val = np.fromfile(first / "val.bin", dtype=np.uint16)
    assert len(train) + len(val) == expected_total
    assert train[-1] == EOT_TOKEN and val[-1] == EOT_TOKEN
    assert int((train == EOT_TOKEN).sum() + (val == EOT_TOKEN).sum()) == len(docs)
    assert 0 < len(val) < len(train)
    for split in ("train.bin", "val.bin"):
        assert (first / split).read_bytes() == (second / split).read_bytes()
    assert not list(first.glob("*.tmp"))


def test_text_files_one_doc_per_line(tmp_path):
    (tmp_path / "in").mkdir()
    lines = [f"line number {i}" for i in range(500)]
    (tmp_path / "in" / "a.txt").write_text("\n".join(lines) + "\n")
    dataset = prepare_corpus(
        "lines", tmp_path / "out", str(tmp_path / "in" / "*.txt"), one_doc_per_line=True, val_fraction=0.1
    )
    tokens = np.concatenate([np.fromfile(dataset / s, dtype=np.uint16) for s in ("train.bin", "val.bin")])
    assert int((tokens == EOT_TOKEN).sum()) == 500


def test_missing_column_lists_the_columns(tmp_path):
    make_parquet_corpus(tmp_path / "in", n_files=1)
    with pytest.raises(PrepareError, match=r"no column 'body' \(columns: text, id\)"):
        prepare_corpus("owt", tmp_path / "out", str(tmp_path / "in" / "*.parquet"), text_column="body")


def test_cli_exit_codes(tmp_path, shakespeare_path):
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "raygpt.prepare",
            "shakespeare_char",
            "--input",
            str(shakespeare_path),
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "vocab 65" in ok.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "raygpt.prepare",
            "shakespeare_char",
            "--input",
            str(tmp_path / "missing.txt"),
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "not found" in bad.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad = subprocess.run(
        [sys.executable, "-m", "raygpt.prepare", "corpus", "--input", str(empty), "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "error:" in bad.stderr


def test_benign_meta_pkl_loads(tmp_path):
    chars = sorted(set("hello world"))
    (tmp_path / "meta.pkl").write_bytes(
        pickle.dumps(
            {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
        )
    )
    meta = load_meta(tmp_path)
    assert meta["chars"] == chars and Tokenizer.from_meta(meta).decode([0, 1]) == "".join(chars[:2])


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_malicious_meta_pkl_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 1, "itos": {0: "a"}, "x": Evil()}))
    with pytest.raises(ValueError, match="refused to load posix.system|refused to load os.system") as error:
        load_meta(tmp_path)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        ('{"tokenizer": "char"}', "positive integer vocab_size"),
        ('{"vocab_size": 3, "tokenizer": "char", "chars": ["a", "b"]}', "'chars' must list the 3 characters"),
        ('{"vocab_size": 3, "tokenizer": "bytes"}', "tokenizer must be 'char' or 'gpt2'"),
    ],
)
def test_malformed_meta_json(tmp_path, content, message):
    (tmp_path / "meta.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_meta(tmp_path)


# --- round three of bad input: each refusal is one line, exit 2, and leaves the folder as it was

TEXT = "To be, or not to be, that is the question.\n" * 400


def prepare_cli(capsys, *argv) -> tuple[int, str]:
    from raygpt.prepare import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def files_under(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize(
    "case, needle",
    [
        ("utf16le_char", "u.txt holds NUL characters: it is binary or UTF-16, not UTF-8 text"),
        ("utf16le_corpus", "u.txt holds NUL characters"),
        ("utf16le_lines", "u.txt holds NUL characters"),
        ("nul_in_text", "u.txt holds NUL characters"),
        ("url_input", "--input https://example.com/input.txt is a URL, but inputs are local files"),
        ("s3_input", "--input s3://bucket/docs/*.txt is a URL, but inputs are local files"),
        ("val_fraction_for_char", "--val-fraction apply to corpus datasets, not shakespeare_char"),
        ("seed_threads_for_bpe", "--seed, --num-threads apply to corpus datasets, not shakespeare"),
        ("empty_data_dir", "--data-dir is empty"),
        ("empty_name", "dataset name '' must be a plain folder name"),
        (
            "uri_missing_slash",
            "--data-dir s3:/bucket/data looks like a URI with a slash missing: write s3://bucket/data",
        ),
        ("uri_without_bucket", "s3:// names no bucket: write s3://BUCKET/PREFIX"),
    ],
)
def test_more_bad_inputs_are_one_line_and_write_nothing(tmp_path, capsys, monkeypatch, case, needle):
    monkeypatch.chdir(tmp_path)  # a path taken as relative would land here, and be seen
    good = tmp_path / "good.txt"
    good.write_text(TEXT)
    bad = tmp_path / "u.txt"
    if case.startswith("utf16le"):
        bad.write_bytes(TEXT.encode("utf-16-le"))  # no byte order mark: every byte is valid UTF-8
    elif case == "nul_in_text":
        bad.write_text(TEXT + "\0" + TEXT)
    dataset, options = {
        "utf16le_char": ("shakespeare_char", ["--input", bad]),
        "utf16le_corpus": ("corpus", ["--input", bad]),
        "utf16le_lines": ("corpus", ["--input", bad, "--one-doc-per-line"]),
        "nul_in_text": ("shakespeare", ["--input", bad]),
        "url_input": ("shakespeare_char", ["--input", "https://example.com/input.txt"]),
        "s3_input": ("corpus", ["--input", "s3://bucket/docs/*.txt"]),
        "val_fraction_for_char": ("shakespeare_char", ["--input", good, "--val-fraction", "0.5"]),
        "seed_threads_for_bpe": ("shakespeare", ["--input", good, "--seed", "3", "--num-threads", "2"]),
        "empty_data_dir": ("corpus", ["--input", good, "--data-dir", ""]),
        "empty_name": ("corpus", ["--input", good, "--name", ""]),
        "uri_missing_slash": ("shakespeare_char", ["--input", good, "--data-dir", "s3:/bucket/data"]),
        "uri_without_bucket": ("shakespeare_char", ["--input", good, "--data-dir", "s3://"]),
    }[case]
    if "--data-dir" not in options:
        options += ["--data-dir", tmp_path / "data"]
    before = files_under(tmp_path)
    code, err = prepare_cli(capsys, dataset, *options)
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert needle in err, err
    assert files_under(tmp_path) == before


def test_a_utf8_byte_order_mark_is_not_a_character_of_the_text(tmp_path):
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_text(TEXT)
    marked.write_bytes(b"\xef\xbb\xbf" + TEXT.encode())
    for name, path in (("plain", plain), ("marked", marked)):
        prepare_shakespeare_char(tmp_path / "data", path, name=name)
        prepare_corpus(name + "_bpe", tmp_path / "data", path, one_doc_per_line=True, val_fraction=0.1)
    for suffix in ("", "_bpe"):
        for split in ("train.bin", "val.bin", "meta.json"):
            ours, theirs = (tmp_path / "data" / (n + suffix) / split for n in ("plain", "marked"))
            assert ours.read_bytes() == theirs.read_bytes(), split


def test_a_killed_preparation_leaves_nothing_that_blocks_or_stays_after_a_rerun(tmp_path, shakespeare_path):
    """SIGKILL mid-write leaves write_atomic's temporary files (nothing can remove them then); the rerun
    removes them, says so, and writes the dataset; while the first run lives, a second is refused."""
    corpus = tmp_path / "big.txt"
    corpus.write_text(shakespeare_path.read_text() * 12)
    data = tmp_path / "data"
    argv = [sys.executable, "-m", "raygpt.prepare", "corpus", "--input", str(corpus), "--data-dir", str(data),
            "--one-doc-per-line", "--num-threads", "1", "--val-fraction", "0.01"]  # fmt: skip
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not any(p.stat().st_size for p in (data / "corpus").glob(".train.bin.*.tmp")):
            assert time.time() < deadline and first.poll() is None, "the first run never started writing"
            time.sleep(0.05)
        second = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and second.stderr.strip().count("\n") == 0, second.stderr
        assert f"another raygpt.prepare is writing {data / 'corpus'}" in second.stderr
    finally:
        first.kill()
        first.wait()
    assert {p.name.split(".")[1] for p in (data / "corpus").glob(".*.tmp")} == {"train", "val"}
    small = tmp_path / "small.txt"
    small.write_text(TEXT)  # the same dataset from a smaller input: the rerun's own work is not the point
    rerun = subprocess.run([*argv[:5], str(small), *argv[6:]], capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"removed 2 temporary file(s) a killed run left in {data / 'corpus'}" in rerun.stderr
    assert sorted(p.name for p in (data / "corpus").iterdir()) == ["meta.json", "train.bin", "val.bin"]
