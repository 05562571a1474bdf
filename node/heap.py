"""Give the C heap's free memory back to the OS after a large snapshot install.

Why: a join decodes its snapshot chunk by chunk, and each chunk's wire buffer and decoded rows
are freed once their entries are stored. glibc keeps most of that freed heap mapped, so a node
that joined a 1M-key namespace held about 16 B/key more resident memory than its replica
needs (docs/benchmarks.md section 15). ``malloc_trim(0)`` returns the free pages; it runs
after an install of at least ``TRIM_AFTER_KEYS`` keys, on the node's I/O thread, outside the
replica lock (ctypes releases the GIL for the call, so readers go on meanwhile). Elsewhere
than glibc (musl, macOS) there is no such call and this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

TRIM_AFTER_KEYS = 100_000

_trim: Callable[[int], int] | None = None
_looked_up = False


def _malloc_trim() -> Callable[[int], int] | None:
    global _trim, _looked_up
    if not _looked_up:
        _looked_up = True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            fn = libc.malloc_trim
        except (OSError, AttributeError):
            fn = None
        if fn is not None:
            fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
        _trim = fn
    return _trim


def release_freed_heap() -> bool:
    """``malloc_trim(0)`` where glibc has it; True when it returned memory to the OS."""
    fn = _malloc_trim()
    if fn is None:
        return False
    released = bool(fn(0))
    logger.debug("malloc_trim after a large install: %s", "released memory" if released
                 else "nothing to release")
    return released
