"""oneDNN's primitive cache: how many compiled matmul kernels a process keeps.

bf16 (and some float32) matmuls on a CPU run through oneDNN, which compiles a primitive per
shape and keeps up to ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` of them (its default: 1024), each
with buffers of its own. Serving meets a new shape with every batch size and every packed
prefill, a round with almost every micro-batch, so the default lets the cache grow by tens
of MiB that nothing reuses (docs/benchmarks.md, "Memory" and "Round memory").

oneDNN reads the variable when it creates its first primitive, so :func:`limit_onednn_cache`
takes effect only in a process that has run no oneDNN op yet (``selflm serve`` at its start,
a round's own worker child); an operator's own value is always kept.
"""

from __future__ import annotations

import os

__all__ = ["ONEDNN_CACHE_ENV", "SERVE_ONEDNN_CACHE", "limit_onednn_cache", "set_here"]

ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
# What `selflm serve` keeps: a decoding step uses ~5 weight shapes at one row count, so 64
# holds the recent row counts and prefill sizes (docs/benchmarks.md, "Memory").
SERVE_ONEDNN_CACHE = 64
_SET_HERE: dict[str, str] = {}  # what limit_onednn_cache set in this process


def limit_onednn_cache(capacity: int) -> None:
    """Cap oneDNN's primitive cache for this process at ``capacity``, unless
    ONEDNN_PRIMITIVE_CACHE_CAPACITY is set already (see the module docstring)."""
    if ONEDNN_CACHE_ENV not in os.environ:
        os.environ[ONEDNN_CACHE_ENV] = str(capacity)
        _SET_HERE[ONEDNN_CACHE_ENV] = str(capacity)


def set_here() -> list[str]:
    """The variables :func:`limit_onednn_cache` set in this process that still hold its
    value (an operator's own settings are not among them)."""
    return [k for k, v in _SET_HERE.items() if os.environ.get(k) == v]
