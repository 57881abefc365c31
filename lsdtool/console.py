"""Stderr console and progress bars: stdout is kept for data."""

from __future__ import annotations

import contextlib
import contextvars
import functools


@functools.lru_cache(maxsize=1)
def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def progress(**kw):
    """A rich Progress on stderr with a bar, counts and ETA; silent where stderr is not a terminal. Inside
    :func:`reporting`, a stand-in that feeds the reporting callback instead."""
    if _REPORTER.get() is not None:
        return _CallbackProgress(_REPORTER.get())
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = stderr_console()
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=console, redirect_stdout=False,
        redirect_stderr=False, transient=True, disable=not console.is_terminal, **kw,
    )


def log(message: str) -> None:
    stderr_console().print(message, highlight=False, soft_wrap=True)


# The Python API reports progress to a callback instead of drawing bars: while ``reporting(cb)`` is
# active, every ``progress()`` inside the library feeds ``cb(description, completed, total)``.
_REPORTER: contextvars.ContextVar = contextvars.ContextVar("lsd_progress_reporter", default=None)


class _CallbackProgress:
    """The part of rich's Progress the library uses, forwarding to ``cb(description, completed, total)``."""

    def __init__(self, callback):
        self.callback, self.tasks = callback, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, description: str, total=None, **kw) -> int:
        self.tasks[len(self.tasks)] = [description, 0, total]
        return len(self.tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        entry = self.tasks[task]
        entry[1] += advance
        self.callback(*entry)

    def reset(self, task: int, total=None, description: str | None = None, **kw) -> None:
        entry = self.tasks[task]
        entry[:] = [description or entry[0], 0, total if total is not None else entry[2]]


def _silent(description, completed, total) -> None:
    pass


@contextlib.contextmanager
def reporting(callback=None):
    """Route the library's progress to ``callback(description, completed, total)`` (None: nowhere)."""
    token = _REPORTER.set(callback or _silent)
    try:
        yield
    finally:
        _REPORTER.reset(token)


class Bars:
    """A progress callback that draws one rich bar per description on stderr (what the CLI passes)."""

    def __init__(self):
        self.progress = progress()
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def __call__(self, description: str, completed: float, total) -> None:
        if description not in self.tasks:
            self.tasks[description] = self.progress.add_task(description, total=total)
        self.progress.update(self.tasks[description], completed=completed, total=total)
