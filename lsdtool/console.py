"""Stderr console and progress bars: stdout is kept for data."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def progress(**kw):
    """A rich Progress on stderr with a bar, counts and ETA; silent where stderr is not a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = stderr_console()
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=console, redirect_stdout=False,
        redirect_stderr=False, transient=True, disable=not console.is_terminal, **kw,
    )


def log(message: str) -> None:
    stderr_console().print(message, highlight=False, soft_wrap=True)
