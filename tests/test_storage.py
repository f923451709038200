"""Datasets in object storage, against a real S3-compatible server on loopback (moto): prepare straight to
s3://, stage into a node-local cache once, verified against meta.json; damaged or missing data is one line."""

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.fs
import pytest
from conftest import TINY_LOCAL_RUN

from raygpt.core.data import Batches
from raygpt.prep.dataset import prepare_dataset
from raygpt.storage import datasets
from raygpt.storage.datasets import (
    DatasetNotFoundError,
    cache_folder,
    check_remote_dataset,
    dataset_uri,
    stage_dataset,
    upload_dataset,
)
from raygpt.storage.uri import StorageError, check_local_path, check_storage_path, open_filesystem

TOKEN_FILES = ("train.bin", "val.bin", "meta.json")


@pytest.fixture(scope="module")
def remote_char(s3_server, shakespeare_path) -> str:
    """shakespeare_char prepared by the CLI straight into a bucket; returns the dataset's URI."""
    data_dir = f"{s3_server.create_bucket()}/data"
    command = [sys.executable, "-m", "raygpt.prepare", "shakespeare_char", "--input", str(shakespeare_path)]
    done = subprocess.run([*command, "--data-dir", data_dir], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"uploaded 2.2 MB to {data_dir}/shakespeare_char" in done.stdout
    return f"{data_dir}/shakespeare_char"


def uploaded_copy(s3_server, char_data: Path) -> tuple[str, pyarrow.fs.FileSystem, str]:
    """The local shakespeare_char uploaded to a fresh bucket, for a test that damages it."""
    uri = f"{s3_server.create_bucket()}/shakespeare_char"
    upload_dataset(char_data / "shakespeare_char", uri, progress=lambda line: None)
    filesystem, path = open_filesystem(uri)
    return uri, filesystem, path


def put(filesystem, path: str, data: bytes) -> None:
    with filesystem.open_output_stream(path) as f:
        f.write(data)


def test_prepare_records_sizes_and_checksums(char_data):
    dataset = char_data / "shakespeare_char"
    files = json.loads((dataset / "meta.json").read_text())["files"]
    for name in ("train.bin", "val.bin"):
        data = (dataset / name).read_bytes()
        assert files[name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_stage_copies_once_verified_and_reports_throughput(remote_char, char_data, tmp_path):
    meta = check_remote_dataset(remote_char)
    assert (meta["vocab_size"], meta["files"]["train.bin"]["bytes"]) == (65, 2 * 1_003_854)
    lines = []
    local = stage_dataset(remote_char, tmp_path, progress=lines.append)
    assert local == cache_folder(remote_char, tmp_path) and local.parent == tmp_path
    for name in TOKEN_FILES:
        assert (local / name).read_bytes() == (char_data / "shakespeare_char" / name).read_bytes()
    assert len(lines) == 1 and lines[0].startswith(f"staged {remote_char} -> {local}: 2.2 MB in ")
    assert lines[0].endswith(" MB/s)") and float(lines[0].split("(")[-1].split()[0].replace(",", "")) > 0
    mtimes = [(local / name).stat().st_mtime_ns for name in TOKEN_FILES]

    again = []
    assert stage_dataset(remote_char + "/", tmp_path, progress=again.append) == local
    assert again == [f"{remote_char}: using the copy staged in {local}"]
    assert [(local / name).stat().st_mtime_ns for name in TOKEN_FILES] == mtimes
    assert sorted(p.name for p in local.iterdir()) == [".staged.json", "meta.json", "train.bin", "val.bin"]


def test_cached_copy_that_does_not_match_is_replaced(remote_char, char_data, tmp_path):
    local = stage_dataset(remote_char, tmp_path, progress=lambda line: None)
    damaged = bytearray((local / "val.bin").read_bytes())
    damaged[100] ^= 0xFF
    (local / "val.bin").write_bytes(damaged)
    lines = []
    stage_dataset(remote_char, tmp_path, progress=lines.append)
    assert lines[:2] == [
        f"{remote_char}: checking the cached train.bin (2.0 MB)",
        f"{remote_char}: checking the cached val.bin (0.2 MB)",
    ]
    assert lines[2].startswith(f"staged {remote_char} -> {local}: 0.2 MB in ")  # only val.bin came again
    assert (local / "val.bin").read_bytes() == (char_data / "shakespeare_char" / "val.bin").read_bytes()


def test_damaged_remote_object_is_refused_in_one_line(s3_server, char_data, tmp_path):
    uri, filesystem, path = uploaded_copy(s3_server, char_data)
    damaged = bytearray((char_data / "shakespeare_char" / "train.bin").read_bytes())
    damaged[12345] ^= 0x01
    put(filesystem, f"{path}/train.bin", bytes(damaged))
    check_remote_dataset(uri)  # the size is right: only the checksum, while staging, can tell
    with pytest.raises(StorageError, match=r"train.bin does not match meta.json \(its sha256 differs\)") as error:
        stage_dataset(uri, tmp_path, progress=lambda line: None)
    assert "\n" not in str(error.value)
    local = cache_folder(uri, tmp_path)
    assert not (local / "train.bin").exists() and not list(local.glob("*.tmp")) and not list(local.glob(".*.tmp"))


def test_truncated_remote_object_is_refused_in_one_line(s3_server, char_data, tmp_path):
    uri, filesystem, path = uploaded_copy(s3_server, char_data)
    put(filesystem, f"{path}/val.bin", (char_data / "shakespeare_char" / "val.bin").read_bytes()[:1000])
    message = rf"{uri}/val.bin has 1,000 bytes but meta.json records 223,080: it was changed or cut short"
    with pytest.raises(StorageError, match=message):
        check_remote_dataset(uri)
    with pytest.raises(StorageError, match=r"val.bin does not match meta.json \(1,000 bytes, not 223,080\)"):
        stage_dataset(uri, tmp_path, progress=lambda line: None)
    assert not (cache_folder(uri, tmp_path) / "meta.json").exists()


def test_missing_or_incomplete_dataset_is_one_line(s3_server, char_data, tmp_path):
    bucket = s3_server.create_bucket()
    for uri in (f"{bucket}/data/nope", "s3://no-such-bucket/data/nope"):
        with pytest.raises(StorageError, match=rf"^no dataset at {uri} \(no meta.json there.*--data-dir \S+/data`$"):
            stage_dataset(uri, tmp_path, progress=lambda line: None)
    uri, filesystem, path = uploaded_copy(s3_server, char_data)
    filesystem.delete_file(f"{path}/meta.json")  # as an interrupted preparation leaves it
    with pytest.raises(DatasetNotFoundError, match=rf"^no dataset at {uri} "):  # the launcher may prepare it
        check_remote_dataset(uri)
    with pytest.raises(StorageError, match="^cannot open nosuchscheme://x/y: Unrecognized filesystem type"):
        check_remote_dataset("nosuchscheme://x/y")
    assert not list(tmp_path.iterdir())  # nothing was cached


def test_unreachable_endpoint_is_one_line(s3_server, monkeypatch, tmp_path):
    with socket_on_loopback() as port:  # bound but not listening: connections are refused at once
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        with pytest.raises(StorageError, match=r"^cannot reach s3://bucket/data/x: .*Could not connect") as error:
            check_remote_dataset("s3://bucket/data/x")
    assert "\n" not in str(error.value)


class socket_on_loopback:
    def __enter__(self) -> int:
        import socket

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        return self.socket.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.socket.close()


def test_prepare_to_a_missing_bucket_is_refused_before_any_work(s3_server, shakespeare_path, tmp_path):
    command = [sys.executable, "-m", "raygpt.prepare", "shakespeare_char", "--input", str(shakespeare_path)]
    done = subprocess.run([*command, "--data-dir", "s3://no-such-bucket/data"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    refusal = "error: s3://no-such-bucket/data/shakespeare_char: bucket or folder 'no-such-bucket' does not exist"
    assert done.stderr == f"{refusal}; create it first\n"


STAGE = (
    "import sys; from pathlib import Path; from raygpt.storage.datasets import stage_dataset; "
    "print(stage_dataset(sys.argv[1], Path(sys.argv[2]), progress=lambda line: print(line, flush=True)), flush=True)"
)


def test_concurrent_stagers_on_one_node_download_once(remote_char, tmp_path):
    """Two real processes ask for the dataset while a third holds the node's lock; once it lets go, one
    of them downloads and the other uses its copy."""
    local = cache_folder(remote_char, tmp_path)
    local.mkdir()
    with open(local.with_name(local.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        outputs = [tmp_path / f"stager{i}.out" for i in range(2)]
        stagers = [
            subprocess.Popen([sys.executable, "-c", STAGE, remote_char, str(tmp_path)], stdout=out.open("w"))
            for out in outputs
        ]
        deadline = time.monotonic() + 60
        while not all("waiting for another process" in out.read_text() for out in outputs):
            assert time.monotonic() < deadline and all(s.poll() is None for s in stagers), "stagers did not wait"
            time.sleep(0.05)
    assert [s.wait(timeout=60) for s in stagers] == [0, 0]
    printed = [out.read_text().splitlines() for out in outputs]
    assert all(lines[-1] == str(local) for lines in printed)
    staged = [line for lines in printed for line in lines if line.startswith(f"staged {remote_char}")]
    reused = [line for lines in printed for line in lines if line.endswith(f"using the copy staged in {local}")]
    assert (len(staged), len(reused)) == (1, 1)


def test_a_dataset_prepared_again_at_the_uri_is_staged_again(s3_server, char_data, shakespeare_path, tmp_path):
    uri, _, _ = uploaded_copy(s3_server, char_data)
    local = stage_dataset(uri, tmp_path / "cache", progress=lambda line: None)
    (tmp_path / "small.txt").write_text(shakespeare_path.read_text()[:50_000])
    data_dir, _ = uri.rsplit("/", 1)
    assert prepare_dataset("shakespeare_char", data_dir, tmp_path / "small.txt") == uri
    lines = []
    assert stage_dataset(uri, tmp_path / "cache", progress=lines.append) == local
    assert lines[-1].startswith(f"staged {uri} -> {local}: 0.1 MB in ")
    assert len(np.fromfile(local / "train.bin", dtype=np.uint16)) == 45_000


def test_a_new_version_is_staged_beside_a_copy_a_run_is_reading(s3_server, char_data, shakespeare_path, tmp_path):
    """A second run, after the dataset was prepared again at the URI, must not rewrite the copy the first
    run has memmapped: the new version goes to a folder of its own."""
    uri, _, _ = uploaded_copy(s3_server, char_data)
    local = stage_dataset(uri, tmp_path / "cache", progress=lambda line: None)
    before = {name: (local / name).read_bytes() for name in TOKEN_FILES}
    reading = Batches(local, 16, 4, seed=1, vocab_size=65)  # what each worker of the first run holds
    (tmp_path / "small.txt").write_text(shakespeare_path.read_text()[:50_000])
    prepare_dataset("shakespeare_char", uri.rsplit("/", 1)[0], tmp_path / "small.txt")
    lines = []
    newer = stage_dataset(uri, tmp_path / "cache", progress=lines.append)
    assert newer != local and newer.parent == local.parent
    assert lines[0] == f"{uri}: a run on this node is reading the copy in {local}: staging this version beside it"
    assert {name: (local / name).read_bytes() for name in TOKEN_FILES} == before
    assert len(np.fromfile(newer / "train.bin", dtype=np.uint16)) == 45_000
    reading.read_lock.release()
    again = []
    assert stage_dataset(uri, tmp_path / "cache", progress=again.append) == newer  # found, not staged again
    assert again == [f"{uri}: using the copy staged in {newer}"]


def test_an_interrupted_upload_leaves_no_dataset(s3_server, char_data, monkeypatch):
    """meta.json goes first and comes back last: stopped between, the URI holds no dataset to stage."""
    uri, _, _ = uploaded_copy(s3_server, char_data)
    upload_file = datasets.upload_file

    def interrupted_at_val(filesystem, local_path, remote_path, uri, meter):
        if local_path.name == "val.bin":
            raise KeyboardInterrupt
        upload_file(filesystem, local_path, remote_path, uri, meter)

    monkeypatch.setattr(datasets, "upload_file", interrupted_at_val)
    with pytest.raises(KeyboardInterrupt):
        upload_dataset(char_data / "shakespeare_char", uri, progress=lambda line: None)
    with pytest.raises(StorageError, match=rf"^no dataset at {uri} \(no meta.json there"):
        check_remote_dataset(uri)


def test_any_pyarrow_filesystem_works_a_local_one_by_file_uri(char_data, shakespeare_path, tmp_path):
    uri = prepare_dataset("shakespeare_char", f"file://{tmp_path}/remote", shakespeare_path)
    assert uri == f"file://{tmp_path}/remote/shakespeare_char"
    local = stage_dataset(uri, tmp_path / "cache", progress=lambda line: None)
    for name in TOKEN_FILES:
        assert (local / name).read_bytes() == (char_data / "shakespeare_char" / name).read_bytes()


def test_a_missing_or_unreachable_dataset_uri_is_one_line_before_ray_starts(s3_server, tmp_path):
    bucket = s3_server.create_bucket()
    argv = [*TINY_LOCAL_RUN, f"--out_dir={tmp_path / 'out'}", f"--storage_path={tmp_path / 'ray'}"]
    missing = launch_cli(*argv, "--dataset=owt", f"--data_dir={bucket}/nothing-here")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert missing.stderr.startswith("error: ") and f"{bucket}/nothing-here/owt" in missing.stderr


def launch_cli(*argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "raygpt.launch", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip


# --- malformed URIs and storage paths: refused in one line before any work (no server needed)


@pytest.mark.parametrize("data_dir", ["s3://", "gs:///", "s3://?endpoint_override=http://127.0.0.1:1"])
def test_a_uri_that_names_no_bucket_is_refused_not_used_with_the_name_as_bucket(data_dir):
    with pytest.raises(StorageError, match=r"names no bucket: write (s3|gs)://BUCKET/PREFIX"):
        dataset_uri(data_dir, "shakespeare_char")


@pytest.mark.parametrize(
    "data_dir, joined",
    [("s3://b", "s3://b/d"), ("s3://b/p/", "s3://b/p/d"), ("file:///", "file:///d"), ("/", "/d"), ("data", "data/d")],
)
def test_uris_and_paths_that_name_a_place_join_as_before(data_dir, joined):
    assert dataset_uri(data_dir, "d") == joined


@pytest.mark.parametrize("path", ["s3:/bucket/data", "gs:bucket", "S3:/b", "https:/example.com/x", "file:/tmp/x"])
def test_a_uri_with_a_slash_missing_is_not_taken_as_a_local_folder(path):
    scheme = path.partition(":")[0]
    with pytest.raises(
        StorageError, match=rf"--data-dir {path} looks like a URI with a slash missing: write {scheme}://"
    ):
        check_local_path(path, "--data-dir")


@pytest.mark.parametrize("path", ["data", "C:/data", "run:1/out", "/tmp/x"])
def test_local_paths_with_or_without_colons_are_left_alone(path):
    check_local_path(path, "--data-dir")


@pytest.mark.parametrize(
    "where, message",
    [
        ("{tmp}/afile", "storage_path {tmp}/afile: {tmp}/afile is a file, not a folder"),
        ("{tmp}/afile/runs", "storage_path {tmp}/afile/runs: {tmp}/afile is a file, not a folder"),
        ("file://{tmp}/afile/runs", "file://{tmp}/afile/runs: '{tmp}/afile' is a file, not a folder"),
        ("s3:/bucket/runs", "looks like a URI with a slash missing: write s3://bucket/runs"),
        ("s3://", "s3:// names no bucket"),
        ("ftp://host/runs", "cannot open ftp://host/runs: Unrecognized filesystem type"),
    ],
)
def test_storage_paths_that_cannot_hold_runs_are_one_line(tmp_path, where, message):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(StorageError) as refused:
        check_storage_path(where.format(tmp=tmp_path))
    assert message.format(tmp=tmp_path) in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("where", ["", "{tmp}/new/runs", "file://{tmp}/new/runs", "{tmp}"])
def test_storage_paths_that_can_hold_runs_pass(tmp_path, where):
    check_storage_path(where.format(tmp=tmp_path))
    assert not (tmp_path / "new").exists()  # checked, not created


def test_prepare_to_a_uri_under_a_file_is_refused_before_any_work(tmp_path, shakespeare_path):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(StorageError, match=r"'.*/afile' is a file, not a folder"):
        prepare_dataset("shakespeare_char", f"file://{tmp_path}/afile/data", shakespeare_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize(
    "where, message",
    [
        ("--storage_path=s3:/bucket/runs", "storage_path s3:/bucket/runs looks like a URI with a slash missing"),
        ("--data_dir=gs:bucket/data", "data_dir gs:bucket/data looks like a URI with a slash missing"),
        ("--out_dir=s3:/bucket/out", "out_dir s3:/bucket/out looks like a URI with a slash missing"),
        ("--out_dir=s3://bucket/out", "out_dir s3://bucket/out is a URI, but out_dir is each node's local folder"),
        ("--storage_path=s3://", "s3:// names no bucket"),  # checked before Ray starts, not once it runs
        ("--storage_path=ftp://host/runs", "cannot open ftp://host/runs"),
    ],
)
def test_the_launcher_refuses_places_that_are_not_what_they_look_like_before_anything_is_made(
    tmp_path, monkeypatch, capsys, where, message
):
    from raygpt import launch

    monkeypatch.chdir(tmp_path)  # a mistyped URI taken as a path would be a folder named 's3:' or 'gs:' here
    argv = [*TINY_LOCAL_RUN, "--local_mode=False", "--out_dir=out", f"--data_dir={tmp_path / 'data'}", where]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []
