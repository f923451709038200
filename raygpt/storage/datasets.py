"""Datasets in object storage: a URI (s3://, gs://, any pyarrow.fs filesystem) -> a node-local cache.

A dataset at a URI is the folder raygpt.prepare writes: train.bin, val.bin and meta.json, which records
each .bin's size and sha256 and is written last, so a URI with a meta.json holds a whole dataset. Each
node copies it once into its cache (a file lock makes the other workers of the node wait), verifies it
against meta.json, and the training code memmaps the local copy as it would any local dataset. An
upload to a URI removes meta.json there first and writes it last. The URIs themselves: raygpt.storage.uri.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from raygpt.core.tokenizer import MAX_META_BYTES, meta_from_json
from raygpt.storage.files import (
    is_folder_locked,
    lock_exclusive,
    remove_orphaned_temporaries,
    write_atomic,
    write_bytes_atomic,
    write_text_atomic,
)
from raygpt.storage.uri import StorageError, check_names_bucket, join_uri, open_filesystem, remote_errors, split_uri

TOKEN_FILES = ("train.bin", "val.bin")  # meta.json is read before them and written after them
# One ranged GET per read: 32 MiB staged 1.7x faster than 8 MiB from moto on loopback (request overhead).
CHUNK_BYTES = 32 << 20
PROGRESS_INTERVAL_S = 5.0
# What was verified against meta.json (a staged copy, or a local dataset once), so a rerun need not hash again.
STAMP_NAME = ".staged.json"
CACHE_ENV = "RAYGPT_DATA_CACHE"
SAY_VERIFYING_BYTES = 256 << 20  # hashing this much takes a noticeable pause: say what it is


class DatasetNotFoundError(StorageError):
    """No meta.json at the URI: nothing prepared there yet (or a preparation that did not finish)."""


def dataset_uri(data_dir: str, name: str) -> str:
    """data_dir/name for a URI data_dir, keeping any ?query (e.g. endpoint_override) at the end. A URI
    that names no bucket (s3://) is refused: the name would silently become the bucket."""
    check_names_bucket(data_dir)
    return join_uri(data_dir, name)


def default_cache_root() -> Path:
    """Where a node keeps staged datasets: $RAYGPT_DATA_CACHE, else ~/.cache/raygpt/datasets (it outlives
    a Ray session, so a rerun on the same node does not download again)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "raygpt" / "datasets").expanduser()


class Meter:
    """Work done against a total (bytes, or a corpus's input bytes and rows), and a progress line at most
    every `interval_s` seconds, worded by `line(meter)`: the one meter of staging, uploading and preparing."""

    def __init__(self, total: int, line: Callable[[Meter], str], progress: Callable[[str], None],
                 interval_s: float = PROGRESS_INTERVAL_S):  # fmt: skip
        self.total, self.line, self.progress, self.interval_s = total, line, progress, interval_s
        self.done = 0
        self.start = self.last = time.perf_counter()

    def add(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.interval_s:
            self.last = now
            self.progress(self.line(self))

    def seconds(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def rate(self) -> float:
        """Work done per second."""
        return self.done / self.seconds()

    def eta(self) -> float:
        """Seconds left at the rate so far."""
        return (self.total - self.done) * self.seconds() / max(self.done, 1)


def transfer_line(what: str) -> Callable[[Meter], str]:
    """A meter's line for bytes moved: what, MB done of MB in all, MB/s."""
    return lambda meter: (
        f"{what}: {meter.done / 1e6:,.1f} of {meter.total / 1e6:,.1f} MB ({meter.rate() / 1e6:,.1f} MB/s)"
    )


# ---- the remote side ---------------------------------------------------------------------------------


def read_remote_meta(filesystem, path: str, uri: str) -> tuple[bytes, dict]:
    """meta.json's bytes and its checked contents; none there means no (complete) dataset at uri."""
    data_dir, name = split_uri(uri)
    missing = DatasetNotFoundError(
        f"no dataset at {uri} (no meta.json there; a preparation still running or interrupted has none yet): "
        f"create it with `python -m raygpt.prepare {name} --data-dir {data_dir}`"
    )
    with remote_errors(uri, missing), filesystem.open_input_stream(f"{path}/meta.json") as f:
        data = f.read(MAX_META_BYTES + 1)
    if len(data) > MAX_META_BYTES:
        raise StorageError(f"{uri}/meta.json is larger than {MAX_META_BYTES >> 20} MiB: not a dataset description")
    return data, meta_from_json(data, f"{uri}/meta.json", name)


def recorded_files(meta: dict, uri: str) -> dict[str, dict]:
    """{'train.bin': {'bytes': n, 'sha256': hex}, ...} from meta.json; one that records none is refused."""
    files = meta.get("files")
    data_dir, name = split_uri(uri)
    for file in TOKEN_FILES:
        record = files.get(file) if isinstance(files, dict) else None
        if not (
            isinstance(record, dict)
            and isinstance(record.get("bytes"), int)
            and re.fullmatch(r"[0-9a-f]{64}", str(record.get("sha256")))
        ):
            raise StorageError(
                f"{uri}/meta.json records no size and sha256 for {file}, so a copy cannot be verified: prepare it "
                f"again with `python -m raygpt.prepare {name} --data-dir {data_dir}`"
            )
    return {file: files[file] for file in TOKEN_FILES}


def check_remote_dataset(uri: str) -> dict:
    """Cheap check before anything starts: meta.json is there and valid, and train.bin and val.bin exist
    with the sizes it records (their checksums are verified when staged). Returns meta.json's contents."""
    filesystem, path = open_filesystem(uri)
    _, meta = read_remote_meta(filesystem, path, uri)
    expected = recorded_files(meta, uri)
    with remote_errors(uri):
        infos = filesystem.get_file_info([f"{path}/{file}" for file in TOKEN_FILES])
    for (file, record), info in zip(expected.items(), infos):
        if info.size is None:
            raise StorageError(f"{uri}/{file} is missing, though meta.json lists it: prepare the dataset again")
        if info.size != record["bytes"]:
            raise StorageError(
                f"{uri}/{file} has {info.size:,} bytes but meta.json records {record['bytes']:,}: it was changed "
                "or cut short; prepare the dataset again"
            )
    return meta


# ---- the node-local copy -----------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def cache_folder(uri: str, cache_root: Path) -> Path:
    """The node-local folder for uri: its dataset name (for people) and a hash of the whole URI (so two
    buckets' datasets of the same name do not meet)."""
    _, name = split_uri(uri)
    key = hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:200]  # with the key, within a file name's 255 bytes
    return Path(cache_root) / f"{readable or 'dataset'}-{key}"


@contextlib.contextmanager
def node_lock(lock_path: Path, uri: str, progress: Callable[[str], None]) -> Iterator[None]:
    """One stager per node: the others wait here. flock dies with its process, so a killed stager
    leaves no lock behind (only temporaries, which the next holder removes)."""
    with open(lock_path, "a") as f:
        lock_exclusive(f, when_held=lambda: progress(f"waiting for another process on this node to stage {uri}"))
        yield  # closing the file releases the lock


def stamp_for(local: Path, meta_bytes: bytes) -> dict:
    files = {file: [(local / file).stat().st_size, (local / file).stat().st_mtime_ns] for file in TOKEN_FILES}
    return {"meta_sha256": hashlib.sha256(meta_bytes).hexdigest(), "files": files}


def is_staged(local: Path, meta_bytes: bytes) -> bool:
    """The copy was verified against this very meta.json and nothing has touched its files since."""
    try:
        return json.loads((local / STAMP_NAME).read_text()) == stamp_for(local, meta_bytes)
    except (OSError, ValueError):
        return False


def verify_once(folder: Path, meta_bytes: bytes, records: dict, progress: Callable[[str], None]) -> str | None:
    """Hash the token files against the sha256s meta.json records, once: a stamp beside them remembers
    that they passed (and for what meta.json, sizes and modification times), so a rerun does not pay for
    it again. Returns the name of the first file that does not match, or None."""
    if is_staged(folder, meta_bytes):
        return None
    total = sum(record["bytes"] for record in records.values())
    if total >= SAY_VERIFYING_BYTES:
        progress(f"verifying {folder} against meta.json's sha256s ({total / 1e9:,.1f} GB; once, then a stamp)")
    for file, record in records.items():
        if file_sha256(folder / file) != record["sha256"]:
            return file
    with contextlib.suppress(OSError):  # a read-only dataset folder: verified again next time
        write_text_atomic(folder / STAMP_NAME, json.dumps(stamp_for(folder, meta_bytes)))
    return None


def copy_matches(path: Path, record: dict) -> bool:
    try:
        return path.stat().st_size == record["bytes"] and file_sha256(path) == record["sha256"]
    except FileNotFoundError:
        return False


def remote_chunks(filesystem, path: str, uri: str) -> Iterator[bytes]:
    with remote_errors(uri), filesystem.open_input_stream(path) as f:
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


def download_verified(filesystem, remote_path: str, local_path: Path, record: dict, uri: str, meter: Meter) -> None:
    """Copy one file, hashing it on the way; a copy that does not match meta.json never gets its name."""

    def write(f) -> None:
        digest, size = hashlib.sha256(), 0
        for chunk in remote_chunks(filesystem, remote_path, uri):
            f.write(chunk)
            digest.update(chunk)
            size += len(chunk)
            meter.add(len(chunk))
        if size != record["bytes"] or digest.hexdigest() != record["sha256"]:
            what = f"{size:,} bytes, not {record['bytes']:,}" if size != record["bytes"] else "its sha256 differs"
            raise StorageError(
                f"{uri}: {local_path.name} does not match meta.json ({what}): it was changed or damaged after "
                "preparation; prepare the dataset again"
            )

    write_atomic(local_path, write)


def stage_dataset(uri: str, cache_root: Path, progress: Callable[[str], None] = print) -> Path:
    """The local folder holding uri's dataset, downloaded once per node and verified against meta.json.
    A cached copy that matches is used as it is; one that does not is replaced."""
    uri = uri.rstrip("/")
    filesystem, path = open_filesystem(uri)
    meta_bytes, meta = read_remote_meta(filesystem, path, uri)
    expected = recorded_files(meta, uri)
    local = cache_folder(uri, cache_root)
    try:
        local.mkdir(parents=True, exist_ok=True)
        with node_lock(local.with_name(local.name + ".lock"), uri, progress):
            # A run on this node may be reading a copy of another version of the dataset (prepared again
            # at the URI since): that copy is never rewritten under it; this version goes to a folder of its own.
            other_version = local.with_name(f"{local.name}-{hashlib.sha256(meta_bytes).hexdigest()[:12]}")
            for folder in (local, other_version):
                if is_staged(folder, meta_bytes):
                    progress(f"{uri}: using the copy staged in {folder}")
                    return folder
            if is_folder_locked(local):
                progress(f"{uri}: a run on this node is reading the copy in {local}: staging this version beside it")
                local = other_version
                local.mkdir(exist_ok=True)
            stage_files(filesystem, path, uri, local, expected, progress)
            write_bytes_atomic(local / "meta.json", meta_bytes)  # last: it marks a whole copy
            write_text_atomic(local / STAMP_NAME, json.dumps(stamp_for(local, meta_bytes)))
    except OSError as e:
        raise StorageError(
            f"cannot write the dataset cache {local}: {e.strerror or e}; point {CACHE_ENV} at a local folder with room"
        ) from None
    return local


def stage_files(filesystem, path: str, uri: str, local: Path, expected: dict, progress) -> None:
    for file in (*TOKEN_FILES, "meta.json", STAMP_NAME):
        remove_orphaned_temporaries(local, file)  # a stager killed here before us; we hold the lock now
    (local / STAMP_NAME).unlink(missing_ok=True)
    (local / "meta.json").unlink(missing_ok=True)
    missing = {}
    for file, record in expected.items():
        if (local / file).exists():
            progress(f"{uri}: checking the cached {file} ({record['bytes'] / 1e6:,.1f} MB)")
        if not copy_matches(local / file, record):
            missing[file] = record
    meter = Meter(sum(record["bytes"] for record in missing.values()), transfer_line(f"staging {uri}"), progress)
    for file, record in missing.items():
        download_verified(filesystem, f"{path}/{file}", local / file, record, uri, meter)
    if missing:
        progress(
            f"staged {uri} -> {local}: {meter.done / 1e6:,.1f} MB in {meter.seconds():.1f}s "
            f"({meter.rate() / 1e6:,.1f} MB/s)"
        )


# ---- writing a dataset to a URI ----------------------------------------------------------------------


def upload_file(filesystem, local_path: Path, remote_path: str, uri: str, meter: Meter) -> None:
    """Stream one file up. An object store shows an upload only once it is closed; one that fails is
    deleted again, so no half file stays under the final name."""
    with remote_errors(uri):
        stream = filesystem.open_output_stream(remote_path)
    try:
        with open(local_path, "rb") as f, remote_errors(uri):
            while chunk := f.read(CHUNK_BYTES):
                stream.write(chunk)
                meter.add(len(chunk))
            stream.close()
    except BaseException:
        with contextlib.suppress(Exception):
            stream.close()
            filesystem.delete_file(remote_path)
        raise


def upload_dataset(local: Path, uri: str, progress: Callable[[str], None] = print) -> None:
    """Copy a prepared dataset folder to uri. meta.json is removed there first and uploaded last, once
    both token files are up with the sizes it records: a dataset without one is incomplete."""
    uri = uri.rstrip("/")
    filesystem, path = open_filesystem(uri)
    meta_bytes = (local / "meta.json").read_bytes()
    sizes = {file: (local / file).stat().st_size for file in TOKEN_FILES}
    meter = Meter(sum(sizes.values()), transfer_line(f"uploading to {uri}"), progress)
    with remote_errors(uri):
        filesystem.create_dir(path, recursive=True)
        if filesystem.get_file_info(f"{path}/meta.json").size is not None:
            filesystem.delete_file(f"{path}/meta.json")
    for file in TOKEN_FILES:
        upload_file(filesystem, local / file, f"{path}/{file}", uri, meter)
    with remote_errors(uri):
        infos = filesystem.get_file_info([f"{path}/{file}" for file in TOKEN_FILES])
    for file, info in zip(TOKEN_FILES, infos):
        if info.size != sizes[file]:
            raise StorageError(f"{uri}/{file} holds {info.size} bytes after upload, not {sizes[file]:,}; try again")
    with remote_errors(uri), filesystem.open_output_stream(f"{path}/meta.json") as f:
        f.write(meta_bytes)
    progress(f"uploaded {meter.done / 1e6:,.1f} MB to {uri} in {meter.seconds():.1f}s ({meter.rate() / 1e6:,.1f} MB/s)")
