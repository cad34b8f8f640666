"""Handing memory back to the system after load (glibc; a no-op elsewhere).

glibc's malloc keeps freed memory in its arenas (one per thread that allocated, up to 8 per
core) and returns it to the system only when the top of the heap is free. A server that ran
16 scans at once keeps their peak: retention, not a leak. Two levers:

- `hand_back()`: malloc_trim(0) returns the free pages of every arena (madvise), called when
  a connection ends;
- `limit_arenas(n)`: mallopt(M_ARENA_MAX, n) caps how many arenas threads created afterwards
  share, so fewer half-empty arenas hold freed memory (set at server start, before the
  connection threads).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

log = logging.getLogger("pisf.memory")
M_ARENA_MAX = -8  # glibc malloc.h
_lock = threading.Lock()
_libc = None
_looked = False


def _glibc():
    """libc with malloc_trim (glibc), or None."""
    global _libc, _looked
    with _lock:
        if not _looked:
            _looked = True
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt"):
                    libc.malloc_trim.argtypes = [ctypes.c_size_t]
                    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                    _libc = libc
            except OSError:
                _libc = None
        return _libc


def hand_back() -> bool:
    """Return freed heap pages to the system; True when glibc released something."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(0))


def limit_arenas(count: int) -> bool:
    """Cap glibc's malloc arenas at `count` (0: leave glibc's default); True when applied."""
    libc = _glibc()
    if libc is None or count <= 0:
        return False
    return bool(libc.mallopt(M_ARENA_MAX, int(count)))
