"""raygpt's URI layer: local paths and URIs (s3://, gs://, any pyarrow.fs filesystem) read, written and listed.

join_uri is the one way a path is joined, for a URI and a local path alike; a small file is read or written
at either (written whole or not at all); what pyarrow raises becomes one line (StorageError). Checkpoints,
eval.json, the compile cache and datasets in object storage (raygpt.storage.datasets) go through here.

S3-compatible stores are reached through the standard AWS variables: AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION.
"""

from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

from raygpt.errors import RaygptError, one_line
from raygpt.storage.files import TEMP_SUFFIX, read_regular_file, write_bytes_atomic

# Schemes whose URIs are commonly given (pyarrow's filesystems, and web URLs people paste).
URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "az", "file", "http", "https")
MAX_SMALL_FILE_BYTES = 1 << 20  # a summary.json or an eval.json is a few lines


class StorageError(RaygptError):
    """A URI that cannot be read, written or trusted; the message is one line."""


def is_uri(path: str | Path) -> bool:
    """s3://bucket/x, gs://..., file:///x: a filesystem scheme, not a local path."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", str(path)) is not None


def join_uri(base: str, *names: str) -> str:
    """base/name/... for a URI or a local path, keeping any ?query (e.g. endpoint_override) at the end."""
    path, sep, query = base.partition("?")
    for name in names:
        scheme, scheme_sep, rest = path.partition("://")
        path = f"{scheme}://{rest.rstrip('/')}/{name}" if scheme_sep else f"{path.rstrip('/')}/{name}"
    return f"{path}{sep}{query}"


def split_uri(uri: str) -> tuple[str, str]:
    """(parent URI, last name) of a URI, the ?query kept with the parent: join_uri's inverse."""
    base, sep, query = uri.partition("?")
    parent, _, name = base.rstrip("/").rpartition("/")
    return f"{parent}{sep}{query}", name


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


def storage_root(storage_path: str) -> str:
    """Ray's storage for runs: storage_path, or Ray's default ~/ray_results."""
    return storage_path or str(Path("~/ray_results").expanduser())


# ---- reaching a filesystem ---------------------------------------------------------------------------


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


def check_destination(uri: str) -> None:
    """Before a long write: the URI's filesystem opens, its bucket (or top folder) exists, and no part of
    the path below it is a file."""
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


# ---- files and folders at a local path or a URI -------------------------------------------------------


def read_small_file(location: str, limit: int | None = MAX_SMALL_FILE_BYTES) -> bytes | None:
    """The bytes of a file at a local path or a URI, or None if there is none. A file larger than `limit`
    bytes (None: any size) is refused, as is anything unreadable, in one line."""
    if not is_uri(location):
        try:
            return read_regular_file(location, limit)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError(f"cannot read {location}: {e.strerror or e}") from None
    filesystem, path = open_filesystem(location)
    try:
        with remote_errors(location), filesystem.open_input_stream(path) as stream:
            data = stream.read() if limit is None else stream.read(limit + 1)
    except StorageError:
        with remote_errors(location):
            if filesystem.get_file_info(path).size is None:
                return None
        raise
    if limit is not None and len(data) > limit:
        raise StorageError(f"cannot read {location}: larger than {limit:,} bytes")
    return data


def write_small_file(location: str, data: bytes | str) -> None:
    """`data` (text as UTF-8) to a local path or a URI, whole or not at all: a reader never sees half a
    file. A local file is written by write_atomic; at a URI the bytes go to a temporary object beside it
    (the name files.py cleans up), which is then moved over it (an object store copies it whole, then
    deletes the temporary). Used for what a worker leaves for the driver, which may run on another
    machine, and for the compile cache."""
    data = data.encode() if isinstance(data, str) else data
    if not is_uri(location):
        write_bytes_atomic(location, data)
        return
    filesystem, path = open_filesystem(location)
    folder, _, name = path.rpartition("/")
    temporary = f"{folder}/.{name}.{uuid.uuid4().hex}{TEMP_SUFFIX}"
    with remote_errors(location):
        filesystem.create_dir(folder, recursive=True)
        try:
            with filesystem.open_output_stream(temporary) as stream:
                stream.write(data)
            filesystem.move(temporary, path)
        except BaseException:
            with contextlib.suppress(Exception):
                if filesystem.get_file_info(temporary).size is not None:
                    filesystem.delete_file(temporary)
            raise


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


def list_files(uri: str, prefix: str, suffix: str) -> list[str]:
    """The names of the files directly in `uri` that start with `prefix` and end with `suffix`, sorted; []
    if there is none (or no such folder)."""
    import pyarrow.fs

    filesystem, path = open_filesystem(uri)
    with remote_errors(uri):
        infos = filesystem.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return sorted(
        info.base_name
        for info in infos
        if info.type == pyarrow.fs.FileType.File
        and info.base_name.startswith(prefix)
        and info.base_name.endswith(suffix)
    )


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
