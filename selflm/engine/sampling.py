"""Per-row next-token choice for a batch whose rows have different sampling parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from selflm.engine.interface import SamplingParams


def apply_repetition_penalty(
    logits: torch.Tensor, seen: Sequence[torch.Tensor], penalties: Sequence[float | None]
) -> None:
    """HF/TGI-style penalty on tokens already in the row (in place)."""
    for i, (ids, p) in enumerate(zip(seen, penalties, strict=True)):
        if p is None or p == 1.0 or ids.numel() == 0:
            continue
        row = logits[i]
        scores = row.gather(0, ids)
        scores = torch.where(scores < 0, scores * p, scores / p)
        row.scatter_(0, ids, scores)


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p on one row of float32 logits."""
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k is not None and 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        remove = probs.cumsum(-1) - probs >= params.top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return logits


def choose_next(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row; returns (token ids [B], their log-probabilities [B])."""
    logits = logits.float()
    logprobs = logits.log_softmax(-1)
    greedy = logits.argmax(-1)
    chosen = greedy.clone()
    for i, p in enumerate(params):
        if not p.do_sample:
            continue
        probs = warp(logits[i], p).softmax(-1)
        chosen[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return chosen, logprobs.gather(1, chosen[:, None])[:, 0]
