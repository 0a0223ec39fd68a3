"""core.malloc.trim hands freed heap memory back to the system (glibc), measured in /proc."""

from __future__ import annotations

import ctypes.util
from pathlib import Path

import pytest

NEEDS_GLIBC = pytest.mark.skipif(
    not Path("/proc/self/status").exists() or ctypes.util.find_library("c") is None,
    reason="needs Linux /proc and a C library",
)


@NEEDS_GLIBC
def test_trim_returns_freed_heap_pages() -> None:
    """Freed heap blocks stay resident until trim() hands them back. In a fresh process
    (what the heap already holds decides where blocks land), each freed 100 KiB block sits
    between two kept ones, so free() alone cannot return it from the heap's top."""
    result = _retained("trim")
    assert float(str(result["retained"])) > 100, result  # of 200 MiB freed, before the trim
    assert float(str(result["after_trim"])) < 20, result


_RETAINED = """
import gc, json, sys
from pathlib import Path
from core.malloc import SERVE_MMAP_THRESHOLD, fix_mmap_threshold, trim

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

mode = sys.argv[1]
fixed = fix_mmap_threshold(SERVE_MMAP_THRESHOLD) if mode == "fix" else None
size = 100 * 1024 if mode == "trim" else 1 << 20  # under / over the fixed threshold
big = b"\\x01" * (16 << 20)  # mmapped; freeing it raises glibc's own threshold to 16 MiB
del big
blocks, pins = [], []
for _ in range((200 << 20) // size):  # 200 MiB, each block between two kept ones
    blocks.append(b"\\x01" * size)
    pins.append(b"\\x02" * size)
before = rss()
del blocks
gc.collect()
retained = rss() - before + 200
trim()
print(json.dumps({"fixed": fixed, "retained": retained, "after_trim": rss() - before + 200}))
"""


def _retained(mode: str, env: dict[str, str] | None = None) -> dict[str, object]:
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", _RETAINED, mode],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=True,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


@NEEDS_GLIBC
def test_a_fixed_mmap_threshold_returns_large_buffers_when_freed() -> None:
    """After one large free glibc serves 1 MiB buffers from the heap, which keeps them
    resident once freed; with the threshold fixed (what `selflm serve` does) they are their
    own mappings and leave with free(). Each run is its own process (mallopt is global).
    (A freed mmapped chunk over 32 MiB does not raise glibc's threshold: hence 16 MiB.)"""
    plain, fixed = _retained("plain"), _retained("fix")
    assert fixed["fixed"] is True
    assert float(str(plain["retained"])) > 150, plain  # of 200 MiB freed
    assert float(str(fixed["retained"])) < 20, fixed
    # An operator's own MALLOC_MMAP_THRESHOLD_ is kept: nothing is set.
    assert _retained("fix", {"MALLOC_MMAP_THRESHOLD_": "4194304"})["fixed"] is False
