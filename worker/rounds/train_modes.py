"""How the update's training step runs: the autocast dtype and activation checkpointing."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from core.modeling import onednn
from core.modeling.device import cpu_has_fast_bf16

__all__ = [
    "AUTOCAST_MODES",
    "ONEDNN_CACHE",
    "autocast_context",
    "autocast_dtype",
    "checkpointing",
    "limit_onednn_cache",
]

log = logging.getLogger(__name__)

AUTOCAST_MODES = ("auto", "bf16", "off")
# oneDNN primitives a round's process keeps (oneDNN's default: 1024). bf16 matmuls on a CPU
# run through oneDNN, and a round meets a new shape with almost every micro-batch and batch
# size; each cached primitive keeps its own buffers. At 64 the bundled model's default
# round peaked at 3045 MiB (5.93x the weights) against 3115 (6.07x), at the same speed
# (update 66 vs 65 s, generate 37 vs 37 s; docs/benchmarks.md, "Round memory").
ONEDNN_CACHE = 64


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """bf16 when asked, or under "auto" where the device runs bf16 matmuls natively.

    float16 is never chosen: it needs loss scaling, and a GPU without bf16 is rare enough
    that float32 is the simpler safe answer there. On a CPU without AVX512-BF16/AMX, bf16
    is emulated and slower than float32, hence the check.
    """
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    return None


def limit_onednn_cache(capacity: int = ONEDNN_CACHE) -> None:
    """Cap oneDNN's primitive cache in a round's process (:mod:`core.modeling.onednn`): the
    Celery worker runs each round in its own child, which has run no oneDNN op yet."""
    onednn.limit_onednn_cache(capacity)


def round_only_env() -> list[str]:
    """Environment variables a round set in this process that a serving process it starts
    must not inherit (the operator's own settings are not among them): the server sets its
    own cap (``selflm serve``)."""
    return onednn.set_here()


def autocast_context(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    # No cast cache: it keeps a bf16 copy of every weight until the forward's context exits,
    # beside the float32 weights, gradients and moments (+290 MiB of update peak on the
    # bundled model, CPU); each weight is used once per forward, so nothing is re-cast.
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=False)


@contextlib.contextmanager
def checkpointing(model: Any, on: bool) -> Iterator[None]:
    """Activation checkpointing (non-reentrant, the form PyTorch recommends) for the block,
    then off again: the trained model goes on to serve and score as it came in."""
    if not on or not getattr(model, "supports_gradient_checkpointing", False):
        if on:
            log.info("gradient checkpointing: not supported by %s", type(model).__name__)
        yield
        return
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.2x's names
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        off = model.activation_checkpointing_disable
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        off = model.gradient_checkpointing_disable
    try:
        yield
    finally:
        off()
