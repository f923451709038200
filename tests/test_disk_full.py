"""A full disk during a run (here: a file-size limit, which fails writes with EFBIG as a full disk fails
them with ENOSPC) ends the run in one line naming it, with no temporary file left. The checkpoint-level
case (the old file kept) is in test_data_checkpoint.py."""

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

from conftest import TINY_LOCAL_RUN

REPO = Path(__file__).resolve().parents[1]
LIMIT = 64 * 1024  # bytes: a tiny model's log lines fit, its checkpoint does not


def limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def test_a_run_that_cannot_write_its_checkpoint_ends_in_one_line(tmp_path, char_data):
    argv = [*TINY_LOCAL_RUN, f"--data_dir={char_data}", f"--out_dir={tmp_path / 'out'}"]
    done = subprocess.run([sys.executable, "-m", "raygpt.launch", *argv], capture_output=True, text=True, timeout=300,
                          preexec_fn=limit_file_size, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training failed: DiskFullError: [Errno 27] cannot write "), done.stderr
    assert "file too large for the file system" in last and "no checkpoint was saved yet" in last
    assert not list((tmp_path / "out").glob(".ckpt.pt.*"))
