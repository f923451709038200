"""Datasets in object storage: a URI (s3://, gs://, any pyarrow.fs filesystem) -> a node-local cache.

A dataset at a URI is the folder raygpt.prepare writes: train.bin, val.bin and meta.json, which records
each .bin's size and sha256 and is written last, so a URI with a meta.json holds a whole dataset. Each
node copies it once into its cache (a file lock makes the other workers of the node wait), verifies it
against meta.json, and the training code memmaps the local copy as it would any local dataset.

S3-compatible stores are reached through the standard AWS variables: AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

from raygpt.core.tokenizer import MAX_META_BYTES, meta_from_json
from raygpt.errors import RaygptError, one_line
from raygpt.storage.files import remove_orphaned_temporaries, write_atomic, write_bytes_atomic, write_text_atomic

TOKEN_FILES = ("train.bin", "val.bin")  # meta.json is read before them and written after them
# One ranged GET per read: 32 MiB staged 1.7x faster than 8 MiB from moto on loopback (request overhead).
CHUNK_BYTES = 32 << 20
PROGRESS_INTERVAL_S = 5.0
STAMP_NAME = ".staged.json"  # what was staged and verified, so a rerun need not hash the copy again
CACHE_ENV = "RAYGPT_DATA_CACHE"
# Schemes whose URIs are commonly given (pyarrow's filesystems, and web URLs people paste).
URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "az", "file", "http", "https")


class StorageError(RaygptError):
    """A dataset URI that cannot be read, written or trusted; the message is one line."""


class DatasetNotFoundError(StorageError):
    """No meta.json at the URI: nothing prepared there yet (or a preparation that did not finish)."""


def is_uri(path: str | Path) -> bool:
    """s3://bucket/x, gs://..., file:///x: a filesystem scheme, not a local path."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", str(path)) is not None


def dataset_uri(data_dir: str, name: str) -> str:
    """data_dir/name for a URI data_dir, keeping any ?query (e.g. endpoint_override) at the end. A URI
    that names no bucket (s3://) is refused: the name would silently become the bucket."""
    check_names_bucket(data_dir)
    base, sep, query = data_dir.partition("?")
    scheme, scheme_sep, rest = base.partition("://")
    base = f"{scheme}://{rest.rstrip('/')}" if scheme_sep else base.rstrip("/")
    return f"{base}/{name}{sep}{query}"


def check_names_bucket(uri: str) -> None:
    """Refuse a URI with nothing after its scheme (s3://, gs://): there is no bucket to read or write."""
    scheme, scheme_sep, rest = uri.partition("?")[0].partition("://")
    if scheme_sep and not rest.strip("/") and scheme.lower() != "file":
        raise StorageError(f"{uri} names no bucket: write {scheme}://BUCKET/PREFIX")


def check_local_path(path: str | Path, flag: str) -> None:
    """Refuse a local path that is a URI with a slash missing (s3:/bucket/x, gs:bucket): used as given,
    it would be a folder named 's3:' in the current directory."""
    scheme, colon, rest = str(path).partition(":")
    if colon and scheme.lower() in URI_SCHEMES and not is_uri(path):
        raise StorageError(f"{flag} {path} looks like a URI with a slash missing: write {scheme}://{rest.lstrip('/')}")


def check_storage_path(storage_path: str) -> None:
    """Before Ray starts: a storage_path URI must open and name a bucket that exists; a local one must not
    be a file (or a mistyped URI)."""
    if not storage_path:
        return
    if is_uri(storage_path):
        check_names_bucket(storage_path)
        check_destination(storage_path)
        return
    check_local_path(storage_path, "storage_path")
    for path in (Path(storage_path).expanduser(), *Path(storage_path).expanduser().parents):
        if path.exists():
            if not path.is_dir():
                raise StorageError(f"storage_path {storage_path}: {path} is a file, not a folder")
            return


def default_cache_root() -> Path:
    """Where a node keeps staged datasets: $RAYGPT_DATA_CACHE, else ~/.cache/raygpt/datasets (it outlives
    a Ray session, so a rerun on the same node does not download again)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "raygpt" / "datasets").expanduser()


# ---- the remote side ---------------------------------------------------------------------------------


def with_endpoint(uri: str) -> str:
    """An s3:// URI with the endpoint AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL names, unless it names one.
    pyarrow 26's from_uri reads these variables itself; older versions and S3FileSystem() do not."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    base, sep, query = uri.partition("?")
    if not base.startswith("s3://") or not endpoint or "endpoint_override=" in query:
        return uri
    extra = urllib.parse.urlencode({"endpoint_override": endpoint})
    return f"{base}?{query}&{extra}" if query else f"{base}?{extra}"


def open_filesystem(uri: str):
    """(pyarrow.fs.FileSystem, path inside it) for a URI; an unknown scheme or bad URI is one line."""
    import pyarrow as pa
    import pyarrow.fs

    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(with_endpoint(uri))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise StorageError(f"cannot open {uri}: {one_line(str(e)) or type(e).__name__}") from None
    return filesystem, path.rstrip("/")


@contextlib.contextmanager
def remote_errors(uri: str, missing: StorageError | None = None) -> Iterator[None]:
    """pyarrow's errors for `uri` as one line; `missing` is raised for a path that does not exist."""
    import pyarrow as pa

    try:
        yield
    except FileNotFoundError:
        raise missing or StorageError(f"{uri} not found") from None
    except (pa.ArrowException, OSError) as e:
        raise StorageError(f"cannot reach {uri}: {one_line(str(e)) or type(e).__name__}") from None


def split_uri(uri: str) -> tuple[str, str]:
    """(data_dir URI, dataset name) of a dataset URI, for the prepare command a message suggests."""
    base, sep, query = uri.partition("?")
    parent, _, name = base.rstrip("/").rpartition("/")
    return f"{parent}{sep}{query}", name


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


class Meter:
    """Progress lines (MB done, MB/s) at most every PROGRESS_INTERVAL_S seconds."""

    def __init__(self, what: str, total_bytes: int, progress: Callable[[str], None]):
        self.what, self.total, self.progress = what, total_bytes, progress
        self.done = 0
        self.start = self.last = time.perf_counter()

    def add(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= PROGRESS_INTERVAL_S:
            self.last = now
            self.progress(
                f"{self.what}: {self.done / 1e6:,.1f} of {self.total / 1e6:,.1f} MB ({self.rate():,.1f} MB/s)"
            )

    def rate(self) -> float:
        return self.done / 1e6 / max(time.perf_counter() - self.start, 1e-9)


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
    return Path(cache_root) / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name) or 'dataset'}-{key}"


@contextlib.contextmanager
def node_lock(lock_path: Path, uri: str, progress: Callable[[str], None]) -> Iterator[None]:
    """One stager per node: the others wait here. flock dies with its process, so a killed stager
    leaves no lock behind (only temporaries, which the next holder removes)."""
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another process on this node to stage {uri}")
            fcntl.flock(f, fcntl.LOCK_EX)
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


def copy_matches(path: Path, record: dict) -> bool:
    try:
        return path.stat().st_size == record["bytes"] and file_sha256(path) == record["sha256"]
    except FileNotFoundError:
        return False


def remote_chunks(filesystem, path: str, uri: str) -> Iterator[bytes]:
    with remote_errors(uri), filesystem.open_input_stream(path) as f:
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


def download(filesystem, remote_path: str, local_path: Path, record: dict, uri: str, meter: Meter) -> None:
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
            if is_staged(local, meta_bytes):
                progress(f"{uri}: using the copy staged in {local}")
                return local
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
    meter = Meter(f"staging {uri}", sum(record["bytes"] for record in missing.values()), progress)
    for file, record in missing.items():
        download(filesystem, f"{path}/{file}", local / file, record, uri, meter)
    if missing:
        seconds = time.perf_counter() - meter.start
        progress(f"staged {uri} -> {local}: {meter.done / 1e6:,.1f} MB in {seconds:.1f}s ({meter.rate():,.1f} MB/s)")


# ---- writing a dataset to a URI ----------------------------------------------------------------------


def check_destination(uri: str) -> None:
    """Before a long preparation: the URI's filesystem opens, its bucket (or top folder) exists, and no
    part of the path below it is a file."""
    import pyarrow.fs

    filesystem, path = open_filesystem(uri)
    parts = path.strip("/").split("/")
    root = "/" if path.startswith("/") else ""
    prefixes = [root + "/".join(parts[: i + 1]) for i in range(len(parts))]
    with remote_errors(uri):
        infos = filesystem.get_file_info(prefixes)
    if infos[0].type != pyarrow.fs.FileType.Directory and root != "/":
        raise StorageError(f"{uri}: bucket or folder {prefixes[0]!r} does not exist; create it first")
    for prefix, info in zip(prefixes, infos):
        if info.type == pyarrow.fs.FileType.File:
            raise StorageError(f"{uri}: {prefix!r} is a file, not a folder")


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
    meter = Meter(f"uploading to {uri}", sum(sizes.values()), progress)
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
    seconds = time.perf_counter() - meter.start
    progress(f"uploaded {meter.done / 1e6:,.1f} MB to {uri} in {seconds:.1f}s ({meter.rate():,.1f} MB/s)")


# ---- checkpoints in object storage -------------------------------------------------------------------


def join_uri(base: str, *names: str) -> str:
    """base/name/..., keeping any ?query (e.g. endpoint_override) at the end."""
    for name in names:
        base = dataset_uri(base, name)
    return base


def list_folders(uri: str, prefix: str) -> list[str]:
    """The names of the folders directly in `uri` that start with `prefix`, sorted; [] if there is none."""
    import pyarrow.fs

    filesystem, path = open_filesystem(uri)
    with remote_errors(uri):
        infos = filesystem.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return sorted(
        info.base_name
        for info in infos
        if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith(prefix)
    )


def read_small_file(uri: str, limit: int = 1 << 20) -> bytes | None:
    """The bytes of a small file at `uri` (at most `limit`), or None if it does not exist."""
    filesystem, path = open_filesystem(uri)
    try:
        with remote_errors(uri), filesystem.open_input_stream(path) as stream:
            return stream.read(limit + 1)[:limit]
    except StorageError:
        with remote_errors(uri):
            if filesystem.get_file_info(path).size is None:
                return None
        raise


def download_folder(uri: str, local: Path) -> Path:
    """Copy the folder at `uri` into `local` (created); returns `local`."""
    import pyarrow.fs

    filesystem, path = open_filesystem(uri)
    local.mkdir(parents=True, exist_ok=True)
    with remote_errors(uri, missing=StorageError(f"nothing at {uri}")):
        if filesystem.get_file_info(path).type != pyarrow.fs.FileType.Directory:
            raise FileNotFoundError(path)
        pyarrow.fs.copy_files(path, str(local), source_filesystem=filesystem,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())  # fmt: skip
    return local


def storage_root(storage_path: str) -> str:
    """Ray's storage for runs: storage_path, or Ray's default ~/ray_results."""
    return storage_path or str(Path("~/ray_results").expanduser())


def write_small_file(location: str, text: str) -> None:
    """`text` to a local path (atomically) or a URI: what a worker leaves for the driver, which may run on
    another machine."""
    if not is_uri(location):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(location), text)
        return
    filesystem, path = open_filesystem(location)
    with remote_errors(location), filesystem.open_output_stream(path) as stream:
        stream.write(text.encode())
