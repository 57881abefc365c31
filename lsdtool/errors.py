"""The one exception type for expected failures, and the one wording of OSErrors; the CLI prints
either as one line, exit 1."""

from __future__ import annotations

import errno


class LsdError(Exception):
    """Bad input or an unmet precondition, described in one sentence."""


def first_line(exc: BaseException, with_type: bool = False) -> str:
    """The first line of an exception's message (``Type: line`` with ``with_type``); the type's name
    when the message is empty."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    if not line:
        return type(exc).__name__
    return f"{type(exc).__name__}: {line}" if with_type else line


_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EISDIR: "it is a directory",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.ENOENT: "no such file or directory",
    errno.EEXIST: "it already exists",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EFBIG: "the file is too large",
    errno.EMFILE: "too many open files",
    errno.EIO: "input/output error",
    errno.EPIPE: "broken pipe",
}


def describe(exc: OSError) -> str:
    """One line naming the path and the cause of an OSError, e.g. ``cannot write out.csv: disk quota exceeded``."""
    cause = _CAUSES.get(exc.errno) or (exc.strerror or str(exc) or type(exc).__name__).lower()
    if exc.filename is None:
        return f"I/O error: {cause}"
    where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else str(exc.filename)
    return f"cannot use {where}: {cause}"
