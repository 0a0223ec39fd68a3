"""How the update's training step runs: the autocast dtype and activation checkpointing."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from core.modeling.device import cpu_has_fast_bf16

__all__ = ["AUTOCAST_MODES", "autocast_context", "autocast_dtype", "checkpointing"]

log = logging.getLogger(__name__)

AUTOCAST_MODES = ("auto", "bf16", "off")


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


def autocast_context(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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
