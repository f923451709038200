"""Local files: the one way raygpt writes a file, reads a small one, takes a file lock, and checks text.

A file is written to a temporary name beside it, fsync'd, then renamed over it. A crash, a kill or a
full disk at any moment leaves either the old file or the new one, never a half-written file under the
real name. The temporary names are `.<name>.<random>.tmp`, so `remove_orphaned_temporaries` can clean
what a killed process left behind. The file gets the mode a plain open() would give it (the umask's for
a new file, the old file's when it replaces one), not the owner-only mode of a temporary file: datasets
and checkpoints on a shared file system stay readable.

A small file (a config, a meta.json, a summary) is read by read_regular_file, which refuses anything
that is not a regular file of at most a given size; its errors are OSErrors that each caller words.
Text is decoded by decode_text (strict UTF-8, no NUL); a lock is lock_exclusive or lock_shared (flock),
and FolderReadLock holds a shared one on a folder while its files are read.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"


class DiskFullError(OSError):
    """The device ran out of space (or the file grew past a size limit) while writing."""


class NotARegularFileError(OSError):
    """A device, a pipe or a socket where a regular file was expected (a folder is IsADirectoryError)."""


class FileTooLargeError(OSError):
    """A file larger than the reader's limit: not the small file it should be."""


class NulCharacterError(ValueError):
    """Text holding a NUL character; `line` is the line of the first one."""

    def __init__(self, line: int):
        super().__init__(f"a NUL character on line {line}")
        self.line = line


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


def read_regular_file(path: str | Path, limit: int | None) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (None: any size). Missing: FileNotFoundError;
    a folder: IsADirectoryError; a device or a pipe: NotARegularFileError (read, it could block or never
    end); larger: FileTooLargeError; a symlink loop and the like: the OSError itself."""
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not stat.S_ISREG(mode):
        raise NotARegularFileError(errno.EINVAL, "Not a regular file", str(path))
    with open(path, "rb") as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise FileTooLargeError(errno.EFBIG, f"Larger than {limit:,} bytes", str(path))
    return data


def decode_text(data: bytes) -> str:
    """A text file's bytes as text: strict UTF-8 (UnicodeDecodeError) without NUL characters
    (NulCharacterError), a leading byte order mark dropped (an encoding marker, not a character of the text)."""
    return check_no_nul(data.decode("utf-8-sig"))


def check_no_nul(text: str) -> str:
    """Refuse text with a NUL character: UTF-16 without a byte order mark decodes as UTF-8 with a NUL after
    every ASCII character, and binary files are full of them; either would be read on without a word."""
    if "\0" in text:
        raise NulCharacterError(text.count("\n", 0, text.index("\0")) + 1)
    return text


def lock_exclusive(f, when_held: Callable[[], None]) -> None:
    """An exclusive flock on an open file or descriptor, until it is closed. When another process holds
    it, when_held() runs first: it raises to refuse, or returns to wait for the lock. The kernel releases
    a flock when its process dies, however it dies: a killed holder leaves no lock behind."""
    _flock(f, fcntl.LOCK_EX, when_held)


def lock_shared(f, when_held: Callable[[], None]) -> None:
    """A shared flock, as lock_exclusive takes an exclusive one: readers share it, and a writer's
    exclusive lock waits for (or is refused by) every reader, as each reader's waits for the writer."""
    _flock(f, fcntl.LOCK_SH, when_held)


def is_locked_exclusively(f) -> bool:
    """Whether another holder has an exclusive lock on f (a writer), rather than shared ones (readers):
    said by trying a shared lock, which is released again at once."""
    try:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(f, fcntl.LOCK_UN)
    return False


def is_folder_locked(folder: str | Path) -> bool:
    """Whether anyone holds a lock on the folder now (a FolderReadLock's reader, or a writer)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # and with it the lock just taken


def _flock(f, mode: int, when_held: Callable[[], None]) -> None:
    try:
        fcntl.flock(f, mode | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    when_held()  # outside the except: a refusal it raises is not "during handling" of the BlockingIOError
    fcntl.flock(f, mode)


class FolderReadLock:
    """A shared lock on a folder (flock on its descriptor) while a process reads the files in it: a
    writer that takes the folder's exclusive lock (raygpt.prepare) refuses while any reader holds it.
    `when_written()` runs where a writer holds the folder now; it raises to refuse, or returns to wait.
    The lock goes with the object (or its process), or at release()."""

    def __init__(self, folder: str | Path, when_written: Callable[[], None]):
        fd = os.open(folder, os.O_RDONLY)
        self._close = weakref.finalize(self, os.close, fd)  # closing the descriptor releases the lock
        try:
            lock_shared(fd, when_written)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        self._close()

    def __enter__(self) -> FolderReadLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
