"""Every file lsd writes goes through here: written to a temp file beside the target, then renamed.

Temp files are named ``.<target name>.<random>.lsdtmp`` so that a kill mid-write leaves only a
recognisable leftover (``is_temp``) and never a half-written target. Finished files get the
permissions the umask allows (``mkstemp`` alone would leave them 0600).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

TEMP_SUFFIX = ".lsdtmp"


def is_temp(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a temp file left by :func:`atomic_write` (e.g. after a kill)."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None,
                 newline: str | None = None) -> Iterator[IO]:
    """Open a temp file beside ``path`` for writing; on success fsync it and rename it onto ``path``.

    On any exception (or KeyboardInterrupt) the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` atomically (``dst`` never holds a partial copy)."""
    with open(src, "rb") as fin, atomic_write(dst, "wb") as fout:
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
    return Path(dst)
