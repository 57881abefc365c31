"""Every file lsd writes goes through here: written to a temp file beside the target, then renamed,
or (``lsd sample -o``, which must stay resumable) appended to under an exclusive lock.

Temp files are named ``.<target name>.<random>.lsdtmp`` so that a kill mid-write leaves only a
recognisable leftover (``is_temp``) and never a half-written target. A writer holds an exclusive
``flock`` on its temp file until the rename, so :func:`remove_if_stale` can tell a leftover from a
file another process is still writing. Finished files get the permissions the umask allows
(``mkstemp`` alone would leave them 0600). Every OSError leaves here naming the target path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import IO, BinaryIO, Iterator

from lsdtool.errors import LsdError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; writers are then not protected from each other
    fcntl = None

TEMP_SUFFIX = ".lsdtmp"


def is_temp(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a temp file left by :func:`atomic_write` (e.g. after a kill)."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _named(exc: OSError, path) -> OSError:
    """``exc`` with ``path`` as its file name when it has none (a failed write() names no file)."""
    if exc.filename is not None:
        return exc
    return type(exc)(exc.errno, exc.strerror or os.strerror(exc.errno or 0), str(path))


def _error(code: int, path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


def _special(path: Path) -> bool:
    """An existing target that is neither a regular file nor a directory (a device, a FIFO)."""
    return path.exists() and not path.is_file() and not path.is_dir()


def _try_lock(fd: int) -> bool:
    """Take an exclusive advisory lock on ``fd`` without waiting; False when another process holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:  # a file system without locks (some NFS/FUSE mounts): write unprotected
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return True
        raise
    return True


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None,
                 newline: str | None = None) -> Iterator[IO]:
    """Open a temp file beside ``path`` for writing; on success fsync it and rename it onto ``path``.

    On any exception (or KeyboardInterrupt) the temp file is removed and ``path`` is left as it was;
    an OSError (full disk, quota, read-only directory, ...) names ``path``. A symlink's target is
    replaced (not the link), and a device or FIFO (``/dev/null``, ``/dev/stdout``) is written in place.
    """
    path = Path(path)
    if _special(path):
        try:
            with open(path, mode.replace("x", "w"), encoding=encoding, newline=newline) as f:
                yield f
        except OSError as exc:
            raise _named(exc, path) from None
        return
    path = Path(os.path.realpath(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise _error(exc.errno, path) from None
    try:
        _try_lock(fd)  # a fresh file: always granted; marks the temp as in use until the rename
        os.fchmod(fd, 0o666 & ~_umask())
        f = os.fdopen(fd, mode, encoding=encoding, newline=newline)
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            f.close()
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _named(exc, path) from None
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


@contextlib.contextmanager
def locked_append(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """``path`` opened for reading and writing (created if missing, never truncated here) under an
    exclusive lock that is held until the block ends.

    A second writer gets an LsdError at once instead of waiting or interleaving. When the block
    fails and this call created the file and nothing was written to it, the file is removed again.
    A device or FIFO (``/dev/stdout``) is opened write-only and not locked.
    """
    path = Path(path)
    if _special(path):
        try:
            with open(path, "wb") as f:
                yield f
        except OSError as exc:
            raise _named(exc, path) from None
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileExistsError:
            fd, created = os.open(path, os.O_RDWR), False
    except OSError as exc:
        raise _named(exc, path) from None
    f = os.fdopen(fd, "r+b")
    try:
        if not _try_lock(fd):
            raise LsdError(f"another lsd is writing {path} (the file is locked); wait for it to finish or write elsewhere")
        yield f
        f.flush()
    except BaseException as exc:
        if created:
            with contextlib.suppress(OSError):
                f.flush()
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_size == 0:
                    os.unlink(path)
        if isinstance(exc, OSError):
            raise _named(exc, path) from None
        raise
    finally:
        with contextlib.suppress(OSError):
            f.close()


def _first_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_dir(path: str | os.PathLike, target: str | os.PathLike | None = None) -> None:
    """Raise an OSError naming ``path`` unless files can be created in directory ``path`` now
    (creating it if needed): a probe file of one byte is written and removed, so a read-only or
    full file system, a missing permission or a file in the way is found before any work starts.
    The error names ``target`` (the file to be written there) when given."""
    path = Path(path)
    name = path if target is None else target
    base = _first_existing(path)
    if not base.is_dir():
        raise _error(errno.ENOTDIR, name)
    try:
        fd, probe = tempfile.mkstemp(prefix=".lsd-probe.", suffix=TEMP_SUFFIX, dir=base)
    except OSError as exc:
        raise _error(exc.errno, name) from None
    try:
        os.write(fd, b"\0")
    except OSError as exc:
        raise _error(exc.errno, name) from None
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


def check_file(path: str | os.PathLike, append: bool = False) -> None:
    """Raise an OSError naming ``path`` unless a file can be written there now (replaced atomically,
    or appended to when ``append``); an LsdError when its directory does not exist. Output files are
    never given directories of their own making (as with curl -o, wget -O, a shell redirection or
    torch.save): a missing directory is far more often a typo than a request."""
    path = Path(path)
    if path.is_dir():
        raise _error(errno.EISDIR, path)
    if _special(path):  # written in place: nothing is created beside it
        return
    parent = Path(os.path.realpath(path)).parent
    if not parent.exists():
        shown = Path(path).parent
        raise LsdError(f"cannot write {path}: the directory {shown} does not exist (create it first: mkdir -p {shown})")
    check_dir(parent, path)
    if append and path.exists():
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        except OSError as exc:
            raise _named(exc, path) from None


def _stale(path: str | os.PathLike, remove: bool) -> bool:
    """Whether ``path`` exists and no process holds its lock; removed (under the lock) when ``remove``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        if not _try_lock(fd):
            return False
        if remove:
            os.unlink(path)
        return True
    finally:
        os.close(fd)  # releases the lock


def in_use(path: str | os.PathLike) -> bool:
    """Whether a process holds the lock on ``path`` (an :func:`atomic_write` temp file being written)."""
    return os.path.exists(path) and not _stale(path, remove=False)


def remove_if_stale(path: str | os.PathLike) -> bool:
    """Remove a temp file no process is writing (its writer would hold the lock); True if removed."""
    return _stale(path, remove=True)
