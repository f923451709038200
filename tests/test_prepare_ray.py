"""`raygpt.prepare ... --ray`: the corpus tokenized by Ray tasks is byte for byte the single-process one."""

import random

import pytest

from raygpt.errors import EXIT_REFUSED
from raygpt.prep import corpus
from raygpt.prep.corpus import prepare_corpus
from raygpt.prepare import main

pytestmark = pytest.mark.ray

OUTPUTS = ("train.bin", "val.bin", "meta.json")


def random_document(rng: random.Random) -> str | None:
    words = ["the", "Ray", "cluster", "tokenizes", " spaces ", "ünïcode", "日本語", "\n", "nanoGPT", "42"]
    kind = rng.random()
    if kind < 0.05:
        return None
    if kind < 0.1:
        return ""
    return " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))


@pytest.fixture
def parquet_corpus(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(7)
    folder = tmp_path / "parquet"
    folder.mkdir()
    for shard in range(3):
        docs = [random_document(rng) for _ in range(150)]
        table = pa.table({"id": list(range(len(docs))), "text": pa.array(docs, pa.string())})
        pq.write_table(table, folder / f"shard-{shard}.parquet", row_group_size=40)
    return folder / "*.parquet"


@pytest.fixture
def text_corpus(tmp_path):
    rng = random.Random(11)
    folder = tmp_path / "text"
    folder.mkdir()
    for shard in range(3):
        lines = [random_document(rng) or "" for _ in range(200)]
        (folder / f"part-{shard}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "*.txt"


def assert_same_outputs(single, distributed) -> None:
    for name in OUTPUTS:
        assert (single / name).read_bytes() == (distributed / name).read_bytes(), name


@pytest.mark.parametrize("one_doc_per_line", [False, True])
def test_ray_text_corpus_matches_single_process(ray_local, tmp_path, text_corpus, monkeypatch, one_doc_per_line):
    # Small tasks, so that many are in flight and their order is what is tested.
    monkeypatch.setattr(corpus, "TASK_CHARS", 500)
    options = dict(one_doc_per_line=one_doc_per_line, val_fraction=0.2, seed=3)
    single = prepare_corpus("corpus", tmp_path / "single", text_corpus, **options)
    distributed = prepare_corpus("corpus", tmp_path / "ray", text_corpus, use_ray=True, **options)
    assert (single / "val.bin").stat().st_size > 0
    assert_same_outputs(single, distributed)


def test_ray_parquet_corpus_matches_single_process_through_the_cli(ray_local, tmp_path, parquet_corpus, monkeypatch):
    monkeypatch.setattr(corpus, "TASK_CHARS", 2000)
    common = ["owt", "--input", str(parquet_corpus), "--val-fraction", "0.1", "--seed", "5"]
    assert main([*common, "--data-dir", str(tmp_path / "single")]) == 0
    assert main([*common, "--data-dir", str(tmp_path / "ray"), "--ray", "--address", ray_local]) == 0
    assert_same_outputs(tmp_path / "single" / "owt", tmp_path / "ray" / "owt")


def test_ray_is_refused_for_the_shakespeare_sets(tmp_path, capsys):
    assert main(["shakespeare_char", "--data-dir", str(tmp_path), "--ray"]) == EXIT_REFUSED
    assert "apply to corpus datasets" in capsys.readouterr().err
    assert not (tmp_path / "shakespeare_char").exists()
