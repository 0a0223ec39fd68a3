"""Meta-step of a round: θ = θ_champion + ε (θ_finetuned − θ_champion), ε picked by score.

This is a Reptile / WiSE-FT interpolation: ε = 1 keeps the fine-tuned weights, smaller ε
pulls them back toward the champion, which often keeps most of the gain on the round's data
while forgetting less of everything else. The dev split, not the training data, chooses ε.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["Delta", "MetaStepResult", "interpolate_into", "meta_step", "state_copy"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetaStepResult:
    """The chosen ε and every ε's score (dev perplexity; lower is better)."""

    epsilon: float
    scores: dict[float, float]
    # θ_finetuned − θ_champion in float64, when asked for: to move to another ε later.
    delta: Mapping[str, Tensor] | None = field(default=None, compare=False, repr=False)

    def ranked(self) -> list[float]:
        """ε from best to worst score (NaN last; ties keep the grid's order)."""
        return sorted(self.scores, key=lambda e: _rank(self.scores[e]))


def _rank(value: float) -> float:
    return value if not math.isnan(value) else math.inf


def _alias_key(t: Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype]:
    # Tied weights (input embedding and LM head) are one tensor under two state-dict keys.
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


def state_copy(model: Any) -> dict[str, Tensor]:
    """Detached CPU clones of the model's state dict.

    Keys that share one tensor in the model (tied weights) share one clone here, so the copy
    costs no more memory than the model, and loading it back keeps the weights tied.
    """
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype], Tensor] = {}
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        alias = _alias_key(value)
        if alias not in seen:
            seen[alias] = value.detach().to("cpu", copy=True)
        out[key] = seen[alias]
    return out


def _float_groups(model: Any) -> list[tuple[list[str], Tensor]]:
    """Floating-point state entries grouped by the storage they live in."""
    groups: dict[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype], list[str]] = {}
    tensors: dict[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype], Tensor] = {}
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            continue
        alias = _alias_key(value)
        groups.setdefault(alias, []).append(key)
        tensors[alias] = value
    return [(keys, tensors[alias]) for alias, keys in groups.items()]


def interpolate_into(
    model: Any, base: Mapping[str, Tensor], delta: Mapping[str, Tensor], eps: float
) -> None:
    """Set the model's floating-point weights to ``base + eps * delta`` in place.

    The sum is formed in float64 and rounded once to the parameter's dtype. With a float64
    ``delta`` (as :func:`meta_step` builds it) ε = 1 gives back the fine-tuned weights bit
    for bit and ε = 0 the base, which a float32 delta cannot promise when a weight changes
    sign or magnitude. Non-floating entries (integer buffers) are left alone.
    """
    with torch.no_grad():
        for keys, target in _float_groups(model):
            key = next((k for k in keys if k in base and k in delta), None)
            if key is None:
                raise KeyError(f"no base/delta entry for {keys[0]!r}")
            b = base[key].to(target.device, torch.float64)
            if isinstance(delta, Delta):  # the same difference, with one read of `base`
                d = delta.tuned[key].to(target.device, torch.float64) - b
            else:
                d = delta[key].to(target.device, torch.float64)
            # state_dict() tensors share storage with the parameters, so copy_ writes through.
            target.copy_(b.add_(d, alpha=eps))


class Delta(Mapping[str, Tensor]):
    """θ_finetuned − θ_champion in float64, formed one tensor at a time on lookup.

    Holds one float32 copy of the fine-tuned weights (not a float64 difference, which
    would cost twice the model); ``base`` may read from the champion's files
    (:class:`~worker.rounds.weights_file.FileWeights`). Each lookup gives the same float64
    tensor a stored difference would. ``clear()`` drops the copy.
    """

    def __init__(self, tuned: dict[str, Tensor], base: Mapping[str, Tensor]) -> None:
        self.tuned, self.base = tuned, base

    def __getitem__(self, key: str) -> Tensor:
        tuned = self.tuned[key]
        if key not in self.base:
            raise KeyError(key)
        # float64: see interpolate_into for why the difference must not be rounded.
        return tuned.to("cpu", torch.float64) - self.base[key].to("cpu", torch.float64)

    def __contains__(self, key: object) -> bool:
        return key in self.tuned and key in self.base

    def __iter__(self) -> Iterator[str]:
        return (k for k in self.tuned if k in self.base)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def clear(self) -> None:
        self.tuned = {}


def _delta(model: Any, base_state: Mapping[str, Tensor]) -> Delta:
    tuned: dict[str, Tensor] = {}
    copies = state_copy(model)
    for keys, _ in _float_groups(model):
        key = next((k for k in keys if k in base_state), None)
        if key is None:
            raise KeyError(f"base state lacks {keys[0]!r}")
        for k in keys:
            tuned[k] = copies[k]
    return Delta(tuned, base_state)


def meta_step(
    model: Any,
    base_state: Mapping[str, Tensor],
    grid: Sequence[float],
    score: Callable[[Any], float],
    keep_delta: bool = False,
) -> MetaStepResult:
    """Try each ε in ``grid`` and leave ``model`` holding the best-scoring interpolation.

    ``model`` holds the fine-tuned weights on entry; ``base_state`` is the champion's state
    (from :func:`state_copy`, or read from its files). ``score(model)`` is lower-is-better;
    a NaN score counts as worst. Ties go to the ε listed first in ``grid``.
    """
    epsilons = list(dict.fromkeys(float(e) for e in grid))
    if not epsilons:
        raise ValueError("the ε grid is empty")
    delta = _delta(model, base_state)
    scores: dict[float, float] = {}
    best: float | None = None
    best_score = math.inf
    current: float | None = None
    for eps in epsilons:
        interpolate_into(model, base_state, delta, eps)
        current = eps
        value = float(score(model))
        scores[eps] = value
        log.info("meta-step ε=%.3g score=%.4f", eps, value)
        rank = _rank(value)
        if best is None or rank < best_score:
            best, best_score = eps, rank
    assert best is not None
    if not math.isfinite(best_score):
        log.warning("meta-step: no ε scored finitely; keeping ε=%.3g", best)
    if current != best:
        interpolate_into(model, base_state, delta, best)
    return MetaStepResult(epsilon=best, scores=scores, delta=delta if keep_delta else None)
