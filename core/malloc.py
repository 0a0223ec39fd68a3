"""Handing freed heap memory back to the system (glibc ``malloc_trim``; elsewhere a no-op).

glibc keeps what a process freed mapped (and raises its mmap threshold after large frees, so
later large tensors come from the heap too): without a trim, a process's resident size stays
at its highest point — a round's update stage, a warm-up over batch sizes, the old model of a
hot swap — long after the memory was freed.

A serving replica also fixes the mmap threshold (:func:`fix_mmap_threshold`): every large
buffer (a step's logits, a layer's grown KV cache, a prefill's activations) then gets its own
mapping and goes back to the system the moment it is freed, instead of a heap that holds the
high-water mark of the batches in between trims (docs/benchmarks.md, "Memory").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"  # an operator's own setting wins
# What `selflm serve` uses: glibc's initial value, kept fixed (glibc raises it up to 32 MiB
# after a large free, so later large tensors come from the heap and stay resident).
SERVE_MMAP_THRESHOLD = 128 * 1024


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


def fix_mmap_threshold(nbytes: int) -> bool:
    """Serve allocations of at least `nbytes` from their own mappings, for the life of the
    process (see the module docstring). Not where the operator set ``MALLOC_MMAP_THRESHOLD_``
    (glibc read it at start) or off glibc. Returns whether it was set."""
    if _LIBC is None or MMAP_THRESHOLD_ENV in os.environ:
        return False
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, nbytes))
