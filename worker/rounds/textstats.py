"""Cheap text statistics shared by selection and evaluation.

Everything here works on a simple lowercased word/punctuation tokenisation rather than the
model's tokenizer: the numbers must be comparable across model versions (a new champion may
ship a different tokenizer) and computable without loading a model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence, Set
from dataclasses import dataclass

__all__ = [
    "DiversityStats",
    "distinct_n",
    "diversity",
    "jaccard",
    "mean_repetition_rate",
    "ngrams",
    "repetition_rate",
    "words",
]

# Words and single punctuation marks: punctuation loops ("!!!!", "...") are a common
# degeneration pattern, so they must count as tokens rather than be discarded.
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """All contiguous n-grams of ``tokens`` in order (empty when ``len(tokens) < n``)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def words(text: str) -> list[str]:
    """Lowercased word and punctuation tokens of ``text``."""
    return _TOKEN_RE.findall(text.lower())


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Corpus-level distinct-n: unique n-grams / total n-grams over all ``texts``.

    Corpus-level (not a mean of per-text ratios) because the question it answers is whether
    the model keeps producing the *same* phrases across samples; per-text averages hide that.
    """
    unique: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        grams = ngrams(words(text), n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def repetition_rate(text: str, n: int = 3) -> float:
    """Fraction of the n-grams in ``text`` that repeat an earlier n-gram of the same text."""
    grams = ngrams(words(text), n)
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def mean_repetition_rate(texts: Sequence[str], n: int = 3) -> float:
    """Unweighted mean of :func:`repetition_rate` over ``texts`` (0.0 for no texts)."""
    if not texts:
        return 0.0
    return sum(repetition_rate(t, n) for t in texts) / len(texts)


def jaccard(a: Set[object], b: Set[object]) -> float:
    """|a ∩ b| / |a ∪ b|.

    Two empty sets give 0.0, not 1.0: with nothing to compare there is no evidence the texts
    are alike, and deduplication must never drop a sample on no evidence.
    """
    if not a and not b:
        return 0.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


@dataclass(frozen=True)
class DiversityStats:
    """Diversity of a set of samples, compared between champion and candidate."""

    distinct_1: float
    distinct_2: float
    repetition_rate: float


def diversity(texts: Sequence[str]) -> DiversityStats:
    """Distinct-1, distinct-2 and mean trigram repetition rate of ``texts``."""
    return DiversityStats(
        distinct_1=distinct_n(texts, 1),
        distinct_2=distinct_n(texts, 2),
        repetition_rate=mean_repetition_rate(texts, 3),
    )
