"""Run a Python script as __main__ and print its peak GPU memory when it exits.

    python benchmarks/peak_memory.py train.py [ARGS...]

nanoGPT's train.py does not report memory; raygpt prints the same figure (torch's allocator high-water
mark, torch.cuda.max_memory_allocated) on its eval lines, so the two are read the same way."""

import atexit
import runpy
import sys
from pathlib import Path


def report_peak() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)


if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    atexit.register(report_peak)
    runpy.run_path(script, run_name="__main__")
