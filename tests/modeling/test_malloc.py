"""core.malloc.trim hands freed heap memory back to the system (glibc), measured in /proc."""

from __future__ import annotations

import ctypes.util
import gc
from pathlib import Path

import pytest

from core.malloc import trim


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(
    not Path("/proc/self/status").exists() or ctypes.util.find_library("c") is None,
    reason="needs Linux /proc and a C library",
)
def test_trim_returns_freed_heap_pages() -> None:
    # 100 KiB blocks sit under glibc's mmap threshold, so they come from the heap; a small
    # block after each keeps the freed ones off the heap's top, where free() alone would
    # give them back.
    blocks: list[bytes] = []
    pins: list[bytes] = []
    for _ in range(2000):  # ~200 MiB
        blocks.append(b"\x01" * (100 * 1024))  # written, so resident
        pins.append(b"\x02" * 1024)  # over pymalloc's 512 bytes: glibc's heap
    del blocks
    gc.collect()
    before = _rss_mib()  # freed but, without a trim, still resident
    trim()
    after = _rss_mib()
    assert before - after > 100, (before, after)
    del pins
