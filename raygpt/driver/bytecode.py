"""The packages whose missing bytecode every new process pays for: a check the launcher makes before Ray
starts (preflight.check_bytecode). Kept apart from preflight, which imports torch, so that it stays cheap
to import on its own."""

from __future__ import annotations

import importlib.util
import os
import sys

# The packages every training process imports, largest first; torch.compile adds sympy and triton.
IMPORTED_PACKAGES = ("torch", "sympy", "triton", "numpy")


def packages_without_bytecode() -> list[str]:
    """The folders of IMPORTED_PACKAGES that have no compiled bytecode (.pyc) for this Python and will
    get none (PYTHONDONTWRITEBYTECODE, or a read-only folder, after `pip install --no-compile`): every
    new process, each worker and each restarted one, compiles their source again, seconds for torch."""
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
