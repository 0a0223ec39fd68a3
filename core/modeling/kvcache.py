"""The running batch's KV cache: rows join it (left-padded to a common width) and the
columns no row attends to any more are trimmed off. Only plain per-layer caches
(``DynamicLayer``, no sliding window) can be joined; :func:`can_join` says which."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def trim(cache: DynamicCache, mask: torch.Tensor) -> torch.Tensor:
    """Drop the left columns no row attends to any more (the padding of rows that left),
    so the batch's width follows its rows, not the longest row it ever held. Positions come
    from the mask, so they do not move. Returns the trimmed mask."""
    used = mask.any(0)
    first = int(used.int().argmax()) if bool(used.any()) else 0
    if first == 0:
        return mask
    for layer in cache.layers:
        assert isinstance(layer, DynamicLayer)
        assert layer.keys is not None and layer.values is not None
        layer.keys = layer.keys[:, :, first:]
        layer.values = layer.values[:, :, first:]
    return mask[:, first:]


def can_join(cache: DynamicCache) -> bool:
    """Rows can join a running batch only with plain per-layer caches (no sliding window)."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def merge(
    cache: DynamicCache,
    mask: torch.Tensor,
    other: list[tuple[torch.Tensor, torch.Tensor]],
    other_mask: torch.Tensor,
) -> torch.Tensor:
    """Append rows to `cache` (in place): `other` holds their keys and values per layer.
    Returns the merged attention mask.

    Both are left-padded to the longer length; padded positions are masked out, and
    positions come from the mask, so every row keeps its own positions.
    """
    width = max(mask.shape[1], other_mask.shape[1])
    for layer, (keys, values) in zip(cache.layers, other, strict=True):
        # can_join() checked these are DynamicLayer: plain key/value tensors.
        assert isinstance(layer, DynamicLayer)
        assert layer.keys is not None and layer.values is not None
        layer.keys = torch.cat([_left_pad(layer.keys, width, 2), _left_pad(keys, width, 2)])
        layer.values = torch.cat([_left_pad(layer.values, width, 2), _left_pad(values, width, 2)])
    return torch.cat([_left_pad(mask, width, 1), _left_pad(other_mask, width, 1)])


def layers_kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for layer in cache.layers:
        assert isinstance(layer, DynamicLayer)
        assert layer.keys is not None and layer.values is not None
        out.append((layer.keys, layer.values))
    return out
