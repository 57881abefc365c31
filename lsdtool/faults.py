"""Process-level faults turned into ordinary exceptions or quiet exits (torch-free, used by the CLI)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator


class Terminated(BaseException):
    """SIGTERM arrived (a job scheduler's time limit, ``kill``): unwinds like Ctrl-C so that temp
    files are removed and locks released before the process exits 143."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated` (only from the main thread, and only where
    no one else installed a handler); the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush into a closed pipe stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (e.g. under a test runner)
        pass


def out_of_memory(exc: BaseException) -> str | None:
    """One line for an allocation failure (Python's MemoryError, torch's CPU or CUDA out-of-memory), else None."""
    text = str(exc)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "can't allocate memory" in text \
            or "out of memory" in text.lower():
        return "out of memory; try a smaller --batch-size (or another --device)"
    return None
