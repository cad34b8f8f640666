"""Handing memory back to the system after load (glibc; a no-op elsewhere).

glibc's malloc keeps freed memory in its arenas (one per thread that allocated, up to 8 per
core) and returns it to the system only when the top of the heap is free. A server that ran
16 scans at once keeps their peak: retention, not a leak. Two levers:

- `hand_back()`: a garbage collection first (a finished stream's arrays held in reference
  cycles, generators and tracebacks, are freed only by the collector), then malloc_trim(0),
  which returns the free pages of every arena (madvise); called when the last connection
  ends, and at most every few seconds while others run (`connection_ended`);
- `limit_arenas(n)`: mallopt(M_ARENA_MAX, n) caps how many arenas threads created afterwards
  share, so fewer half-empty arenas hold freed memory (set at server start, before the
  connection threads).

Measured (`pisf bench --chains pisf --slices 4 --connections 16 --after-idle 10`, shared 2-core
machine; RSS before the load / peak / 10 s after, MiB): neither 233 / 974 / 912; malloc_trim
alone 190 / 810 / 448; the collection alone 268 / 864 / 426; both 161 / 847 / 188; both with 2
arenas 160 / 664 / 166. Both steps are needed; the arena cap lowers the peak.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
import time

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
    started = time.monotonic()
    gc.collect()
    libc = _glibc()
    released = bool(libc.malloc_trim(0)) if libc is not None else False
    log.debug("memory handed back in %.0f ms (trim released pages: %s)", (time.monotonic() - started) * 1000, released)
    return released


HAND_BACK_INTERVAL_S = 3.0  # while other connections run: a collection holds the GIL 40-120 ms here
_last_hand_back = [0.0]


def connection_ended(others_active: int) -> bool:
    """After a connection ends: hand memory back when it was the last one; while others still
    run, at most every HAND_BACK_INTERVAL_S (they wait for the collection). True when it ran."""
    now = time.monotonic()
    if others_active and now - _last_hand_back[0] < HAND_BACK_INTERVAL_S:
        return False
    _last_hand_back[0] = now
    hand_back()
    return True


def limit_arenas(count: int) -> bool:
    """Cap glibc's malloc arenas at `count` (0: leave glibc's default); True when applied."""
    libc = _glibc()
    if libc is None or count <= 0:
        return False
    return bool(libc.mallopt(M_ARENA_MAX, int(count)))
