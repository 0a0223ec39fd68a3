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
    if params.typical_p is not None and params.typical_p < 1.0:
        logits = typical_filter(logits, params.typical_p)
    return logits


def _uniforms(generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One U[0, 1) draw per row from the row's own (CPU) generator: a row draws the same
    whether it decodes alone or beside others."""
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])


def _inverse_cdf(probs: torch.Tensor, keep: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Sample per row from `probs[:, :keep]` (unnormalized, [B, K]) with uniforms `u` [B]:
    a batched inverse-CDF draw. Returns indices into the K columns, or -1 where the kept
    mass is not a distribution (NaN, inf, zero: the caller takes the greedy choice)."""
    cols = torch.arange(probs.shape[-1], device=probs.device)
    kept = probs.double().masked_fill(cols[None, :] >= keep[:, None], 0.0)
    cdf = kept.cumsum(-1)
    total = cdf[:, -1]
    pick = torch.searchsorted(cdf, (u * total)[:, None], right=True)[:, 0]
    # u * total can round up to total: stay inside the kept prefix.
    pick = torch.minimum(pick, keep - 1)
    bad = ~torch.isfinite(total) | (total <= 0)
    return pick.masked_fill(bad, -1)


def _sample_truncated(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int | None]:
    """Rows whose top-k / top-p set lies inside the top CANDIDATES: sampled from those,
    all rows at once (tensor operations; one uniform draw per row from its generator).

    Returns a token per row, or None where the row needs the full path.
    """
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)
    scaled = logits / temps[:, None]
    k = min(CANDIDATES, scaled.shape[-1])
    vals, idx = scaled.topk(k, dim=-1)  # sorted, descending
    # Probabilities under the full distribution, so top_p is measured exactly.
    probs = (vals - scaled.logsumexp(-1, keepdim=True)).exp()
    # The draws run where the rows' seeded generators live (the CPU): one copy of the
    # candidates per step rather than a small transfer per row (no-op on a CPU).
    idx, probs = idx.cpu(), probs.cpu()
    greedy = logits.argmax(-1).cpu()
    has_k = torch.tensor([p.top_k is not None for p in params])
    top_k = torch.tensor([p.top_k if p.top_k is not None else k for p in params])
    top_p = torch.tensor(
        [p.top_p if p.top_p is not None and p.top_p < 1.0 else 2.0 for p in params],
        dtype=probs.dtype,
    )
    # As `warp` (and transformers): top-k first, then top-p on the renormalized top-k
    # distribution; without top-k, top-p on the full distribution. The kept set is a
    # prefix of the sorted candidates (always at least one token).
    in_k = torch.arange(k)[None, :] < top_k.clamp(max=k)[:, None]
    pk = probs.masked_fill(~in_k, 0.0)
    mass = torch.where(has_k, pk.sum(-1), torch.ones_like(top_p))[:, None]
    cum = pk.cumsum(-1) / mass
    in_nucleus = ((cum - pk / mass) < top_p[:, None]) & in_k
    keep = in_nucleus.sum(-1).clamp(min=1)
    # The full path: a top_k beyond the candidates, or a nucleus reaching beyond them.
    full = (top_k > k) | (~has_k & (top_p <= 1.0) & (cum[:, -1] < top_p))
    pick = _inverse_cdf(probs, keep, _uniforms(generators))
    chosen = idx.gather(1, pick.clamp(min=0)[:, None])[:, 0]
    chosen = torch.where(pick >= 0, chosen, greedy)
    return [None if f else t for f, t in zip(full.tolist(), chosen.tolist(), strict=True)]


def _sample_plain(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """Rows sampled from the whole vocabulary at their temperature (no top-k/top-p/typical),
    all at once."""
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)
    probs = (logits / temps[:, None]).softmax(-1).cpu()
    keep = torch.full((len(params),), probs.shape[-1], dtype=torch.long)
    pick = _inverse_cdf(probs, keep, _uniforms(generators))
    greedy = logits.argmax(-1).cpu()
    return torch.where(pick >= 0, pick, greedy).tolist()


def choose_next(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row; returns (token ids [B], their log-probabilities [B])."""
    logits = finite_logits(logits.float())
    logprobs = logits.log_softmax(-1)
    chosen = logits.argmax(-1)
    truncated: list[int] = []
    plain: list[int] = []
    for i, p in enumerate(params):
        if not p.do_sample or p.typical_p is not None:  # typical sampling: the full path
            continue
        if p.top_k is not None or (p.top_p is not None and p.top_p < 1.0):
            truncated.append(i)
        else:
            plain.append(i)
    picks: dict[int, int | None] = {}
    if truncated:
        fast = _sample_truncated(
            logits[truncated], [params[i] for i in truncated], [generators[i] for i in truncated]
        )
        picks.update(zip(truncated, fast, strict=True))
    if plain:
        drawn_plain = _sample_plain(
            logits[plain], [params[i] for i in plain], [generators[i] for i in plain]
        )
        picks.update(zip(plain, drawn_plain, strict=True))
    sampled: dict[int, int] = {}
    for i, p in enumerate(params):
        if not p.do_sample:
            continue
        tok = picks.get(i)
        if tok is None:  # the exact path, row by row (rare: see _sample_truncated)
            # Row generators are CPU generators (the same draws on every device).
            probs = warp(logits[i], p).softmax(-1).cpu()
            drawn = draw(probs, generators[i])
            tok = drawn if drawn is not None else int(chosen[i])
        sampled[i] = tok
    if sampled:
        rows = list(sampled)
        chosen[rows] = torch.tensor([sampled[i] for i in rows], device=chosen.device)
    return chosen, logprobs.gather(1, chosen[:, None])[:, 0]


# -- features of the TGI / OpenAI surfaces (kept apart from the core path above) ----------


def typical_filter(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling (Meister et al.; transformers' TypicalLogitsWarper), one row."""
    logp = logits.log_softmax(-1)
    p = logp.exp()
    entropy = -(logp * p).nansum(-1, keepdim=True)
    shifted = (-logp - entropy).abs()
    sorted_scores, order = torch.sort(shifted)
    cum = logits.gather(-1, order).softmax(-1).cumsum(-1)
    last = int((cum < mass).sum().clamp(max=logits.shape[-1] - 1))
    remove_sorted = sorted_scores > sorted_scores[last]
    remove_sorted[0] = False  # always keep at least one token
    remove = torch.zeros_like(remove_sorted).scatter(0, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_frequency_presence(
    logits: torch.Tensor,
    generated: Sequence[Sequence[int]],
    frequency: Sequence[float | None],
    presence: Sequence[float | None],
) -> None:
    """OpenAI's additive penalties on tokens the row has generated so far (in place)."""
    for i, (ids, f, p) in enumerate(zip(generated, frequency, presence, strict=True)):
        if not ids or not (f or p):
            continue
        toks, counts = torch.unique(torch.tensor(ids, dtype=torch.long), return_counts=True)
        toks = toks.to(logits.device)
        penalty = counts.to(logits.device, logits.dtype) * (f or 0.0) + (p or 0.0)
        logits[i, toks] -= penalty


def top_alternatives(logits: torch.Tensor, n: int) -> tuple[list[list[int]], list[list[float]]]:
    """The `n` most likely tokens per row and their log-probabilities."""
    vals, idx = logits.float().log_softmax(-1).topk(n, dim=-1)
    return idx.tolist(), vals.tolist()
