"""Process management that makes runs start and end sooner, and cleanly: a fast exit, and the packages
whose missing bytecode every new process pays for.

Nothing here changes what is computed; each function falls back to torch's or Python's own behaviour.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def exit_without_teardown(code: int) -> NoReturn:
    """End the process as interpreter exit would, minus the teardown of every module and object.

    After a GPU run that teardown (CUDA graphs, the CUDA context, then torch's and Ray's modules) takes
    seconds (benchmarks/RESULTS.md) and does nothing a finished run needs: the
    checkpoint is written and closed, the results printed. What a normal exit does for the program
    still happens, in the same order: thread pools are shut down and other non-daemon threads joined
    (CPython's own threading._shutdown), then the atexit handlers run (Ray's shutdown, logging's flush,
    Inductor's compile-worker shutdown, WandB's)."""
    threading._shutdown()
    atexit._run_exitfuncs()  # CPython's own exit path; errors in handlers are printed, as at exit
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


# The packages every training process imports, largest first; torch.compile adds sympy and triton.
IMPORTED_PACKAGES = ("torch", "sympy", "triton", "numpy")


def packages_without_bytecode() -> list[str]:
    """The folders of IMPORTED_PACKAGES that have no compiled bytecode (.pyc) for this Python and will
    get none (PYTHONDONTWRITEBYTECODE, or a read-only folder, after `pip install --no-compile`): every
    new process, each worker and each restarted one, compiles their source again, seconds for torch."""
    import importlib.util

    folders = []
    for name in IMPORTED_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        cached = importlib.util.cache_from_source(spec.origin)
        if os.path.exists(cached):
            continue
        existing = os.path.dirname(cached)
        while existing and not os.path.isdir(existing):
            existing = os.path.dirname(existing)
        if sys.dont_write_bytecode or not os.access(existing, os.W_OK):
            folders.append(os.path.dirname(spec.origin))
    return folders
