"""Keep a CPU run's row-chunk temporaries in the C heap between chunks (glibc's malloc only).

An engine step works through its rows in chunks whose float64 temporaries are a few MiB each. With
glibc's default, adaptive thresholds the heap top they leave free is handed back to the system after
most chunks, so the next chunk page-faults the same memory in again: on SEDD-small (V = 50k) that
tripled the confidence rule's engine time. :func:`keep_temporaries` fixes the thresholds instead:
blocks under 16 MiB come from the heap, and up to 64 MiB of free heap top is kept for the next chunk
(benchmarks/engine_overhead.py --memory: sampling's peak measured within 1.15x the bare forward's).
A process whose user set its own (``MALLOC_*_`` or ``GLIBC_TUNABLES``) keeps theirs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 16 << 20  # twice a chunk's float64 temporary (2^20 elements); larger blocks are mapped as before
TRIM_THRESHOLD = 64 << 20  # above a chunk's temporaries together (four to six float64 blocks of 8 MiB)
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")


@functools.cache
def keep_temporaries() -> bool:
    """Set glibc's fixed thresholds once per process; whether they are in force (False off glibc or when the
    user chose their own)."""
    if any(name in os.environ for name in _USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):  # glibc's parameters only
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
