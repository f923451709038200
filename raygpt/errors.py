"""One error base class for what raygpt refuses, and the one way every CLI reports it.

A refusal is one line on stderr (`error: ...`) and exit status 2; nothing is written or lost. Each
module raises its own subclass (ConfigError, DataError, CheckpointError, ...), so a caller can still
tell them apart.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


class RaygptError(Exception):
    """Bad input or state found by raygpt; the message is one line that says how to fix it."""


class LaunchError(RaygptError, RuntimeError):
    """Something the launcher found wrong before training started; the message is one line."""


EXIT_REFUSED = 2  # argparse's status for bad usage; every refusal uses it
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def one_line(text: str) -> str:
    """The first non-empty line of an error message (some libraries' messages run to many lines)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


MAX_LINE = 1000  # characters: a message that echoes a 5,000-character path still reads as one line


def refuse(error: BaseException) -> int:
    """Print `error: <message>` and return the refusal exit status."""
    line = one_line(str(error)) or type(error).__name__
    if len(line) > MAX_LINE:
        line = f"{line[: MAX_LINE - 40]}... ({len(line):,} characters)"
    print(f"error: {line}", file=sys.stderr, flush=True)
    return EXIT_REFUSED


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a bad option refused as every refusal is: one `error:` line and exit 2 (argparse
    prints its usage block first). `hint` says where to look next (default: the tool's --help)."""

    def __init__(self, *args, hint: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.hint = hint or f"see {self.prog} --help"

    def error(self, message: str):
        self.exit(EXIT_REFUSED, f"error: {one_line(message)} ({self.hint})\n")


EXIT_BROKEN_PIPE = 128 + 13  # SIGPIPE's status, as a shell reports a command a closed pipe ended


def run_cli(main: Callable[[], int]) -> int:
    """Run a CLI's body: a RaygptError becomes one line and exit 2, Ctrl-C exit 130 without a traceback,
    and a reader that stopped reading (`| head`) ends it quietly, as it ends cat."""
    try:
        return main()
    except RaygptError as e:
        return refuse(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Python would flush stdout again at exit and print a second error: point it at nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
