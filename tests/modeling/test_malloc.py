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
    result = _retained()
    assert float(str(result["retained"])) > 100, result  # of 200 MiB freed, before the trim
    assert float(str(result["after_trim"])) < 20, result


_RETAINED = """
import gc, json, sys
from pathlib import Path
from core.malloc import trim

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

size = 100 * 1024  # under glibc's mmap threshold: from the heap
blocks, pins = [], []
for _ in range((200 << 20) // size):  # 200 MiB, each block between two kept ones
    blocks.append(b"\\x01" * size)
    pins.append(b"\\x02" * size)
before = rss()
del blocks
gc.collect()
retained = rss() - before + 200
trim()
print(json.dumps({"retained": retained, "after_trim": rss() - before + 200}))
"""


def _retained() -> dict[str, object]:
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", _RETAINED],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result
