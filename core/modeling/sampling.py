"""Per-row next-token choice for a batch whose rows have different sampling parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from core.modeling.params import SamplingParams

# Nucleus candidates taken with topk before falling back to a full sort. A 49k-vocabulary
# sort per row per step costs more than the model's small-batch decode step on a CPU; the
# top 1024 tokens hold the nucleus of a trained model almost always, and where they do not
# the row is handled exactly by the full path.
CANDIDATES = 1024


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


def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits a degenerate row cannot turn into NaN probabilities for its neighbours.

    NaN becomes -inf (never chosen), +inf the largest finite value (the row's pick, as the
    limit of the penalty or temperature that made it). A row left with no finite logit at
    all has nothing sensible to choose: that raises, and the caller fails that row alone.
    """
    if bool(torch.isfinite(logits).all()):  # the common case: one check, no copy
        return logits
    big = torch.finfo(logits.dtype).max
    out = torch.nan_to_num(logits, nan=float("-inf"), posinf=big, neginf=float("-inf"))
    if not bool(torch.isfinite(out).any(-1).all()):
        raise ValueError("a row's logits are all NaN or -inf")
    return out


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int | None:
    """One multinomial draw, or None where `probs` is not a distribution (NaN, inf, all
    zero: a temperature or penalty that over- or underflowed float32). The caller then takes
    the row's greedy choice, the limit such parameters tend to."""
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return None
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p on one row of float32 logits (the exact, full path)."""
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


def _sample_truncated(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int | None]:
    """Rows whose top-k / top-p set lies inside the top CANDIDATES: sampled from those.

    Returns a token per row, or None where the row needs the full path.
    """
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)
    scaled = logits / temps[:, None]
    k = min(CANDIDATES, scaled.shape[-1])
    vals, idx = scaled.topk(k, dim=-1)  # sorted, descending
    # Probabilities under the full distribution, so top_p is measured exactly.
    probs = (vals - scaled.logsumexp(-1, keepdim=True)).exp()
    # The per-row work below runs where the rows' seeded generators live (the CPU): one copy
    # of the candidates per step rather than a small transfer per row (no-op on a CPU).
    vals, idx, probs = vals.cpu(), idx.cpu(), probs.cpu()
    cum = probs.cumsum(-1)
    out: list[int | None] = []
    for i, p in enumerate(params):
        row_vals = vals[i]
        if p.top_k is not None:
            if p.top_k > k:
                out.append(None)
                continue
            row_vals = row_vals.clone()
            row_vals[p.top_k :] = float("-inf")
        if p.top_p is not None and p.top_p < 1.0:
            if float(cum[i, -1]) < p.top_p:
                out.append(None)  # the nucleus reaches beyond the candidates
                continue
            remove = cum[i] - probs[i] >= p.top_p
            row_vals = row_vals.masked_fill(remove, float("-inf"))
        choice = draw(row_vals.softmax(-1), generators[i])
        out.append(int(idx[i, choice]) if choice is not None else int(logits[i].argmax()))
    return out


def choose_next(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row; returns (token ids [B], their log-probabilities [B])."""
    logits = finite_logits(logits.float())
    logprobs = logits.log_softmax(-1)
    chosen = logits.argmax(-1)
    truncated = [
        i
        for i, p in enumerate(params)
        if p.do_sample and (p.top_k is not None or (p.top_p is not None and p.top_p < 1.0))
    ]
    picks: dict[int, int | None] = {}
    if truncated:
        fast = _sample_truncated(
            logits[truncated], [params[i] for i in truncated], [generators[i] for i in truncated]
        )
        picks = dict(zip(truncated, fast, strict=True))
    sampled: dict[int, int] = {}
    for i, p in enumerate(params):
        if not p.do_sample:
            continue
        tok = picks.get(i)
        if tok is None:
            # Row generators are CPU generators (the same draws on every device).
            probs = warp(logits[i], p).softmax(-1).cpu()
            drawn = draw(probs, generators[i])
            tok = drawn if drawn is not None else int(chosen[i])
        sampled[i] = tok
    if sampled:
        rows = list(sampled)
        chosen[rows] = torch.tensor([sampled[i] for i in rows], device=chosen.device)
    return chosen, logprobs.gather(1, chosen[:, None])[:, 0]
