"""Prepare a dataset by name, into DATA_DIR/NAME or to a URI: the two Shakespeare sets, or a corpus.

What `python -m raygpt.prepare` and the launcher's auto-prepare call. A URI --data-dir (s3://, gs://,
any pyarrow filesystem) is prepared in a local temporary folder and uploaded, meta.json last
(raygpt.storage.datasets).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from raygpt.config.schema import check_name_lengths
from raygpt.prep.corpus import prepare_corpus
from raygpt.prep.output import PrepareError, check_dataset_name
from raygpt.prep.shakespeare import prepare_shakespeare_bpe, prepare_shakespeare_char
from raygpt.storage.datasets import dataset_uri, upload_dataset
from raygpt.storage.uri import check_destination, check_local_path, is_uri


def prepare_dataset(
    name: str,
    data_dir: str | Path = "data",
    input_path: str | Path | None = None,
    input_flag: str = "--input",
    output_name: str | None = None,
    **corpus_options,
) -> Path | str:
    """Prepare a dataset by name into DATA_DIR/(output_name or name): the two Shakespeare sets, or a
    corpus of text/parquet files. `input_flag` is how the caller's users pass input_path, for hints.
    A URI data_dir returns the dataset's URI instead of its folder."""
    check_places(data_dir, input_path, input_flag)
    output_name = name if output_name is None else output_name
    if is_uri(data_dir):
        return prepare_to_uri(name, str(data_dir), input_path, input_flag, output_name, **corpus_options)
    if name == "shakespeare_char":
        return prepare_shakespeare_char(data_dir, input_path, output_name, input_flag)
    if name == "shakespeare":
        return prepare_shakespeare_bpe(data_dir, input_path, output_name, input_flag)
    return prepare_corpus(output_name, data_dir, input_path, input_flag=input_flag, **corpus_options)


def check_places(data_dir: str | Path, input_path: str | Path | None, input_flag: str) -> None:
    """Refuse, before any work, an output place that is empty or a URI with a slash missing (s3:/bucket
    would be a local folder named 's3:'), and an input that is a URL: inputs are local files."""
    if not str(data_dir):
        raise PrepareError("--data-dir is empty: give the folder (or URI) the dataset goes to, e.g. --data-dir data")
    check_local_path(data_dir, "--data-dir")
    check_name_lengths("--data-dir", str(data_dir))
    if input_path is not None and (is_uri(input_path) or str(input_path).startswith(("http:/", "https:/"))):
        raise PrepareError(
            f"{input_flag} {input_path} is a URL, but inputs are local files: download it first "
            f"(e.g. curl -o FILE URL) and pass {input_flag} FILE"
        )


def prepare_to_uri(
    name: str, data_dir: str, input_path, input_flag: str, output_name: str | None, **corpus_options
) -> str:
    """Prepare into a local temporary folder (under $TMPDIR: it needs room for the outputs), then upload."""
    check_dataset_name(output_name)
    uri = dataset_uri(data_dir, output_name)
    check_destination(uri)  # before the work: a missing bucket is found in a second, not after an hour
    with tempfile.TemporaryDirectory(prefix="raygpt-prepare-") as tmp:
        local = prepare_dataset(name, tmp, input_path, input_flag, output_name, **corpus_options)
        upload_dataset(local, uri)
    return uri
