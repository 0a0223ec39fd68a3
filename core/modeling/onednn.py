"""oneDNN's primitive caches: how many compiled matmul kernels a process keeps.

bf16 (and some float32) matmuls on a CPU run through oneDNN, which compiles a primitive per
shape. Two caches keep them, each up to 1024 entries by default, each entry with buffers of
its own: oneDNN's own (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) and the one PyTorch's mkldnn
matmul path keeps through ideep (``LRU_CACHE_CAPACITY``). Serving meets a new shape with
every batch size and every prefill length, a round with almost every micro-batch, so the
defaults let a process grow by hundreds of MiB that nothing reuses (docs/benchmarks.md,
"Memory" and "Round memory").

Both are read when the first primitive is created, so :func:`limit_onednn_cache` takes
effect only in a process that has run no oneDNN op yet (``selflm serve`` at its start, a
round's own worker child); an operator's own value of either variable is always kept.
"""

from __future__ import annotations

import os

__all__ = [
    "CACHE_ENVS",
    "IDEEP_CACHE_ENV",
    "ONEDNN_CACHE_ENV",
    "SERVE_ONEDNN_CACHE",
    "limit_onednn_cache",
    "set_here",
]

ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
IDEEP_CACHE_ENV = "LRU_CACHE_CAPACITY"  # PyTorch's mkldnn (ideep) primitive cache
CACHE_ENVS = (ONEDNN_CACHE_ENV, IDEEP_CACHE_ENV)
# What `selflm serve` keeps: a decoding step uses 6 weight shapes at its row count, used
# again every step, so 16 keeps them and the last prefills' while a packed step's new row
# count (every join) evicts the oldest. At 64 a replica under steady load held ~45 MiB more
# at the same speed (docs/benchmarks.md, "Memory", session 13).
SERVE_ONEDNN_CACHE = 16
_SET_HERE: dict[str, str] = {}  # what limit_onednn_cache set in this process


def limit_onednn_cache(capacity: int) -> None:
    """Cap both primitive caches of this process at ``capacity``, each unless its variable
    is set already (see the module docstring)."""
    for name in CACHE_ENVS:
        if name not in os.environ:
            os.environ[name] = str(capacity)
            _SET_HERE[name] = str(capacity)


def set_here() -> list[str]:
    """The variables :func:`limit_onednn_cache` set in this process that still hold its
    value (an operator's own settings are not among them)."""
    return [k for k, v in _SET_HERE.items() if os.environ.get(k) == v]
