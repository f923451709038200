"""One run at a time on an out_dir and a Ray run: an OS file lock held by the launching process.

The lock is `flock` on a file (raygpt.storage.files.lock_exclusive), so it dies with its process: a run
killed with SIGKILL leaves a lock file but no lock, and rerunning the command at once works. The file's
content (the holder's pid and host) is only there for the message a second run prints.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

from raygpt.config.schema import NAME_MAX, PATH_MAX, shown
from raygpt.errors import LaunchError, RaygptError
from raygpt.storage.files import lock_exclusive
from raygpt.storage.uri import storage_root

LOCK_NAME = ".raygpt.lock"


class RunLockedError(RaygptError):
    """Another process holds the run; the message is one line."""


class RunLock:
    """Held locks on lock files; release() or process exit lets them go, discard() also removes the
    files this lock created (a refused launch leaves nothing behind)."""

    def __init__(self):
        self.files: list = []
        self.created: list[Path] = []

    def acquire(self, lock_path: Path, what: str, way_out: str = "pass another --out_dir") -> None:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            existed = lock_path.exists()
            f = open(lock_path, "a+")  # noqa: SIM115 - held open for the whole run: closing it releases the lock
            lock_exclusive(f, when_held=functools.partial(refuse_held, f, what, way_out))
            if same_file(f, lock_path):
                break
            f.close()  # a refused launch removed the file we opened before we locked it: lock the new one
        else:
            raise RunLockedError(f"{what}: its lock file {lock_path} keeps being replaced; try again")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        self.files.append(f)
        if not existed:
            self.created.append(lock_path)

    def release(self) -> None:
        for f in self.files:
            f.close()
        self.files.clear()
        self.created.clear()

    def discard(self) -> None:
        """Release, removing the lock files this lock created. Each is removed while still locked, and a
        launch that opened it meanwhile finds, once it has the lock, that it is not the file at the path."""
        for path in self.created:
            try:
                path.unlink()
            except OSError:
                pass
        self.release()


def refuse_held(f, what: str, way_out: str) -> None:
    f.seek(0)
    holder = f.read().strip() or "another process"
    f.close()
    raise RunLockedError(f"{what} is in use by another raygpt run ({holder}); wait for it to end, or {way_out}")


def same_file(f, path: Path) -> bool:
    """Whether the open file `f` is still the file at `path`."""
    try:
        on_path, opened = os.stat(path), os.fstat(f.fileno())
        return (on_path.st_dev, on_path.st_ino) == (opened.st_dev, opened.st_ino)
    except OSError:
        return False


def lock_run(out_dir: str, storage_path: str, run_name: str, ray_run: bool = True) -> RunLock:
    """Lock out_dir and, for a run on Ray (`ray_run`; local mode writes no Ray storage) where storage is a
    local path, the Ray run folder's name in it. Each refusal names the one way out that frees it."""
    wanted = [(Path(out_dir) / LOCK_NAME, f"out_dir {out_dir}", "pass another --out_dir")]
    if ray_run and "://" not in storage_path:
        storage = Path(storage_root(storage_path))
        # Beside the run folder, not in it: the run folder belongs to Ray.
        wanted.append((storage / f".{run_name}{LOCK_NAME}", f"Ray run '{run_name}' in {storage}",
                       "pass another --run_name"))  # fmt: skip
    for lock_path, _, _ in wanted:  # before any lock is taken: a refusal leaves no lock file behind
        check_lock_name(lock_path, run_name)
    lock = RunLock()
    try:
        for lock_path, what, way_out in wanted:
            lock.acquire(lock_path, what, way_out)
    except BaseException:
        lock.release()
        raise
    return lock


def check_lock_name(lock_path: Path, run_name: str) -> None:
    """A lock file the OS can make: its name at most NAME_MAX bytes (it holds the run name), its path
    shorter than PATH_MAX."""
    name_bytes, path_bytes = len(os.fsencode(lock_path.name)), len(os.fsencode(str(lock_path)))
    if name_bytes > NAME_MAX:
        raise LaunchError(
            f"run name {shown(run_name)} is too long for its lock file's name ({name_bytes} bytes, over the "
            f"{NAME_MAX} a file system allows): pass a shorter --run_name"
        )
    if path_bytes >= PATH_MAX:
        raise LaunchError(
            f"the lock file {shown(str(lock_path))} would be a path of {path_bytes:,} bytes, over the "
            f"{PATH_MAX - 1:,} the OS allows: pass a shorter --storage_path or --run_name"
        )
