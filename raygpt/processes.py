"""The launcher's fast exit: a finished run ends without tearing down every module and object.

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
