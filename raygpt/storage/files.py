"""The one way raygpt writes a file: to a temporary name beside it, fsync'd, then renamed over it.

A crash, a kill or a full disk at any moment leaves either the old file or the new one, never a
half-written file under the real name. The temporary names are `.<name>.<random>.tmp`, so
`remove_orphaned_temporaries` can clean what a killed process left behind. The file gets the mode a
plain open() would give it (the umask's for a new file, the old file's when it replaces one), not the
owner-only mode of a temporary file: datasets and checkpoints on a shared file system stay readable.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"


class DiskFullError(OSError):
    """The device ran out of space (or the file grew past a size limit) while writing."""


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(file)` on a temporary file beside `path`, fsync it, and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, writer = None, None
    try:  # from the moment the temporary file exists: a Ctrl-C anywhere after it still removes it
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.fchmod(fd, mode_for(path))
        with os.fdopen(fd, "wb") as f:
            writer = _ErrorRecordingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)  # the rename itself survives a power cut only once the folder is synced
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        # torch.save reports a failed write as a RuntimeError; the OSError underneath says why.
        e = e if isinstance(e, OSError) or writer is None or writer.error is None else writer.error
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            reason = {
                errno.ENOSPC: "no space left on the device",
                errno.EFBIG: "file too large for the file system",
                errno.EDQUOT: "disk quota exceeded",
            }[e.errno]
            raise DiskFullError(e.errno, f"cannot write {path}: {reason}") from None
        raise


def mode_for(path: Path) -> int:
    """The permission bits open(path, "w") would leave: the existing file's, else 0o666 less the umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def current_umask() -> int:
    try:  # Linux shows it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it, then set it back
    os.umask(mask)
    return mask


class _ErrorRecordingWriter:
    """A binary file's write and flush, remembering the OSError a failed write raised."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not every platform opens folders
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_orphaned_temporaries(directory: str | Path, name: str) -> list[Path]:
    """Delete `.<name>.*.tmp` files in `directory`: what write_atomic leaves when its process is killed.

    Call it only where no other process may be writing `name` at the same time (under the run lock)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for tmp in directory.glob(f".{name}.*{TEMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove the folders a refused or failed command made (deepest first), those still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass
