"""Select step of a self-update round: filter, deduplicate, pick a training set, split.

Pure Python on purpose: selection runs in the worker before any model is loaded for training,
and has to be reproducible from the round's recorded seed alone.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from worker.rounds.textstats import jaccard, ngrams, repetition_rate, words

__all__ = [
    "STRATEGIES",
    "FilterConfig",
    "Sample",
    "Strategy",
    "dedup",
    "filter_degenerate",
    "select",
    "select_difficulty",
    "select_diversity",
    "select_random",
    "split_train_valid",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One generated sample.

    ``text`` is the generated continuation only (the prompt is kept separately so statistics
    are not inflated by prompts shared between samples). ``loss`` is the mean per-token loss
    under the champion; the caller fills it in when the ``difficulty`` strategy is used.
    """

    text: str
    prompt: str = ""
    loss: float | None = None
    # BOS + prompt + continuation ids as generated, so later stages need not re-tokenise.
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class FilterConfig:
    """Bounds for :func:`filter_degenerate` and :func:`dedup`."""

    min_words: int = 8
    max_repetition: float = 0.5
    dedup_threshold: float = 0.7
    shingle_n: int = 3

    def __post_init__(self) -> None:
        # Fail at configuration time rather than silently keeping or dropping everything.
        if self.min_words < 0:
            raise ValueError(f"min_words must be >= 0, got {self.min_words}")
        if not 0.0 <= self.max_repetition <= 1.0:
            raise ValueError(f"max_repetition must be in [0, 1], got {self.max_repetition}")
        if not 0.0 < self.dedup_threshold <= 1.0:
            raise ValueError(f"dedup_threshold must be in (0, 1], got {self.dedup_threshold}")
        if self.shingle_n < 1:
            raise ValueError(f"shingle_n must be >= 1, got {self.shingle_n}")


Strategy = Callable[[Sequence[Sample], int, random.Random], list[Sample]]


def _word_count(tokens: Sequence[str]) -> int:
    # Punctuation tokens do not make a text long enough to learn from.
    return sum(1 for t in tokens if t[0].isalnum() or t[0] == "_")


def _shingles(text: str, n: int) -> set[tuple[str, ...]]:
    tokens = words(text)
    if 0 < len(tokens) < n:
        # A text shorter than one shingle still has content; treat it as a single shingle so
        # two identical short texts are not considered unrelated.
        return {tuple(tokens)}
    return set(ngrams(tokens, n))


def filter_degenerate(
    samples: Sequence[Sample], cfg: FilterConfig | None = None
) -> tuple[list[Sample], int]:
    """Drop samples that are too short or too repetitive; return ``(kept, n_dropped)``.

    Repetition is the trigram repetition rate, the same measure the evaluation step reports,
    so the filter's bound and the reported diversity mean the same thing.
    """
    cfg = cfg or FilterConfig()
    kept: list[Sample] = []
    short = loopy = 0
    for s in samples:
        tokens = words(s.text)
        if _word_count(tokens) < cfg.min_words:
            short += 1
        elif repetition_rate(s.text, 3) > cfg.max_repetition:
            loopy += 1
        else:
            kept.append(s)
    log.debug(
        "degenerate filter: kept %d, dropped %d short, %d repetitive", len(kept), short, loopy
    )
    return kept, short + loopy


# --- MinHash / LSH -------------------------------------------------------------------------

# 2**61 - 1 is prime, so (a*x + b) mod P is a universal hash family over 61-bit inputs.
_MERSENNE = (1 << 61) - 1
_NUM_PERM = 128
# Fixed seed: signatures must be identical in every process and across restarts.
_PERM_SEED = 0x5E1F_1A4B
_rng_perm = random.Random(_PERM_SEED)
_PERMS: tuple[tuple[int, int], ...] = tuple(
    (_rng_perm.randrange(1, _MERSENNE), _rng_perm.randrange(0, _MERSENNE)) for _ in range(_NUM_PERM)
)
del _rng_perm
# Highest acceptable chance that a pair exactly at the threshold never shares a band.
_MAX_MISS = 1e-3


def _shingle_hash(shingle: tuple[str, ...]) -> int:
    # blake2b, not hash(): str hashing is salted per process (PYTHONHASHSEED). Tokens contain
    # no whitespace, so joining on a space is injective.
    digest = hashlib.blake2b(" ".join(shingle).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MERSENNE


def _minhash(shingles: set[tuple[str, ...]]) -> tuple[int, ...]:
    if not shingles:
        return (_MERSENNE,) * _NUM_PERM
    hs = [_shingle_hash(s) for s in shingles]
    # A list, not a generator, inside min(): measurably faster on this hot path.
    return tuple(min([(a * x + b) % _MERSENNE for x in hs]) for a, b in _PERMS)


def _lsh_rows(threshold: float) -> int:
    """Rows per band: the most selective banding that still finds threshold-level pairs.

    A pair with Jaccard s shares at least one of b bands of r rows with probability
    1 - (1 - s**r)**b. More rows mean fewer false candidates to verify, so take the largest r
    whose miss probability at s = threshold stays below ``_MAX_MISS`` (pairs above the
    threshold are missed even less often). False candidates are harmless: every candidate is
    confirmed with the exact Jaccard.
    """
    for rows in range(_NUM_PERM, 0, -1):
        bands = _NUM_PERM // rows
        if (1.0 - threshold**rows) ** bands <= _MAX_MISS:
            return rows
    return 1


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def dedup(
    samples: Sequence[Sample], cfg: FilterConfig | None = None
) -> tuple[list[Sample], int, int]:
    """Remove exact and near duplicates, keeping first occurrences in input order.

    Exact: equal after lowercasing and collapsing whitespace. Near: word ``shingle_n``-gram
    Jaccard >= ``dedup_threshold`` with any already kept sample. MinHash + LSH banding only
    proposes candidates; each is confirmed with the exact Jaccard, so a pair below the
    threshold is never dropped, and the cost stays near-linear instead of O(n²).

    Returns ``(kept, exact_removed, near_removed)``.
    """
    cfg = cfg or FilterConfig()
    rows = _lsh_rows(cfg.dedup_threshold)
    bands = _NUM_PERM // rows
    buckets: list[dict[tuple[int, ...], list[int]]] = [{} for _ in range(bands)]
    seen_exact: set[str] = set()
    kept: list[Sample] = []
    kept_shingles: list[set[tuple[str, ...]]] = []
    exact_removed = near_removed = 0

    for s in samples:
        key = _normalise(s.text)
        if key in seen_exact:
            exact_removed += 1
            continue
        seen_exact.add(key)

        sh = _shingles(s.text, cfg.shingle_n)
        sig = _minhash(sh)
        band_keys = [sig[i * rows : (i + 1) * rows] for i in range(bands)]
        candidates: set[int] = set()
        if sh:  # an empty shingle set has Jaccard 0 with everything
            for band, bkey in enumerate(band_keys):
                candidates.update(buckets[band].get(bkey, ()))
        # Sorted so the outcome never depends on set iteration order.
        if any(jaccard(sh, kept_shingles[j]) >= cfg.dedup_threshold for j in sorted(candidates)):
            near_removed += 1
            continue

        idx = len(kept)
        kept.append(s)
        kept_shingles.append(sh)
        if sh:
            for band, bkey in enumerate(band_keys):
                buckets[band].setdefault(bkey, []).append(idx)

    log.debug(
        "dedup: kept %d, removed %d exact and %d near duplicates (threshold %.2f, %dx%d bands)",
        len(kept),
        exact_removed,
        near_removed,
        cfg.dedup_threshold,
        bands,
        rows,
    )
    return kept, exact_removed, near_removed


# --- strategies ----------------------------------------------------------------------------


def _check_k(k: int) -> None:
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")


def select_random(samples: Sequence[Sample], k: int, rng: random.Random) -> list[Sample]:
    """``min(k, len(samples))`` samples uniformly without replacement."""
    _check_k(k)
    return rng.sample(list(samples), min(k, len(samples)))


def select_diversity(samples: Sequence[Sample], k: int, rng: random.Random) -> list[Sample]:
    """Greedy max-min selection under distance 1 - Jaccard of word-bigram sets.

    Starts from a random sample, then repeatedly adds the sample farthest from everything
    chosen so far, so near-copies are picked only after every far-apart text is. O(n·k)
    Jaccard computations; ties go to the earliest sample to stay deterministic.
    """
    _check_k(k)
    n = len(samples)
    k = min(k, n)
    if k == 0:
        return []
    grams = [_shingles(s.text, 2) for s in samples]
    first = rng.randrange(n)
    chosen = [first]
    taken = [False] * n
    taken[first] = True
    min_dist = [1.0 - jaccard(grams[i], grams[first]) for i in range(n)]
    while len(chosen) < k:
        best = -1
        best_d = -1.0
        for i in range(n):
            if not taken[i] and min_dist[i] > best_d:
                best, best_d = i, min_dist[i]
        chosen.append(best)
        taken[best] = True
        for i in range(n):
            if not taken[i]:
                d = 1.0 - jaccard(grams[i], grams[best])
                if d < min_dist[i]:
                    min_dist[i] = d
    return [samples[i] for i in chosen]


# Bands for the difficulty strategy, as fractions of the candidate pool sorted by loss.
_EASY_FRACTION = 0.25  # lowest-loss quartile: already known or memorised, little to learn
_GARBAGE_FRACTION = 0.05  # highest-loss tail: usually broken text, not useful surprise


def select_difficulty(samples: Sequence[Sample], k: int, rng: random.Random) -> list[Sample]:
    """Prefer the middle-to-high surprise band of per-sample champion loss.

    The lowest-loss quartile and the top 5% are set aside. From the rest, sorted by loss
    descending, ``k`` evenly spaced picks are taken, so the set spans the band instead of
    being only the hardest (likely noise) or only the easiest. If the band has fewer than
    ``k`` samples, it is filled from the easy quartile's highest-loss samples. The top 5% is
    never used, so the result is shorter than ``k`` only when ``k`` exceeds 95% of the pool.

    Raises ``ValueError`` if any sample lacks a finite loss.
    """
    _check_k(k)
    losses: list[float] = []
    for i, s in enumerate(samples):
        if s.loss is None or not math.isfinite(s.loss):
            raise ValueError(f"difficulty selection needs a finite loss on every sample (#{i})")
        losses.append(s.loss)
    n = len(samples)
    # Shuffle before the stable sort so equal losses are ordered by the seeded rng rather
    # than by generation order.
    order = list(range(n))
    rng.shuffle(order)
    order.sort(key=losses.__getitem__)
    n_easy = int(n * _EASY_FRACTION)
    n_garbage = int(n * _GARBAGE_FRACTION)
    easy = order[:n_easy]
    band = order[n_easy : n - n_garbage]
    band.reverse()  # loss descending

    m = len(band)
    if k <= m:
        # Centre of each of k equal slices: distinct indices since m / k >= 1.
        picks = [band[(2 * j + 1) * m // (2 * k)] for j in range(k)]
    else:
        picks = band + easy[::-1][: k - m]
    log.debug(
        "difficulty: pool %d, easy %d, garbage %d, band %d, picked %d",
        n,
        n_easy,
        n_garbage,
        m,
        len(picks),
    )
    return [samples[i] for i in picks]


STRATEGIES: dict[str, Strategy] = {
    "random": select_random,
    "diversity": select_diversity,
    "difficulty": select_difficulty,
}


def select(samples: Sequence[Sample], k: int, strategy: str, rng: random.Random) -> list[Sample]:
    """Pick up to ``k`` training samples with the named strategy."""
    try:
        fn = STRATEGIES[strategy]
    except KeyError:
        raise ValueError(
            f"unknown selection strategy {strategy!r}; expected one of {sorted(STRATEGIES)}"
        ) from None
    return fn(samples, k, rng)


def split_train_valid(
    samples: Sequence[Sample], valid_fraction: float, rng: random.Random
) -> tuple[list[Sample], list[Sample]]:
    """Shuffle and split into ``(train, valid)``.

    With two or more samples each side gets at least one: an empty D_valid would leave early
    stopping and the candidate-vs-champion comparison with nothing to measure.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    shuffled = list(samples)
    rng.shuffle(shuffled)
    n = len(shuffled)
    if n < 2:
        return shuffled, []
    n_valid = min(max(round(n * valid_fraction), 1), n - 1)
    return shuffled[n_valid:], shuffled[:n_valid]
