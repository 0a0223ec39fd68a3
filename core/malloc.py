"""Handing freed heap memory back to the system (glibc ``malloc_trim``; elsewhere a no-op).

glibc keeps what a process freed mapped (and raises its mmap threshold after large frees, so
later large tensors come from the heap too): without a trim, a process's resident size stays
at its highest point — a round's update stage, a warm-up over batch sizes, the old model of a
hot swap — long after the memory was freed. A serving replica also trims every second
while batches run (``app/engine/batcher.py``).
"""

from __future__ import annotations

import ctypes
import ctypes.util


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name)
        lib.malloc_trim  # noqa: B018 (glibc only)
    except (OSError, AttributeError, TypeError):
        return None
    return lib


_LIBC = _libc()


def trim() -> None:
    """Return the heap's free pages to the system."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
