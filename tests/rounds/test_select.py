import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from worker.rounds import select as sel
from worker.rounds.select import (
    STRATEGIES,
    FilterConfig,
    Sample,
    Strategy,
    dedup,
    filter_degenerate,
    select,
    select_difficulty,
    select_diversity,
    select_random,
    split_train_valid,
)
from worker.rounds.textstats import jaccard, ngrams, words

NORMAL = "The quick brown fox jumps over the lazy dog near the quiet river bank today."
THIRTY = (
    "python lists keep their items in insertion order and support slicing appending "
    "sorting reversing and comprehension syntax which makes them the most common container "
    "for ordered data in everyday scripts"
)
assert len(THIRTY.split()) == 30


def _texts(samples: Sequence[Sample]) -> list[str]:
    return [s.text for s in samples]


# --- config and filter ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"min_words": -1}, {"max_repetition": 1.5}, {"dedup_threshold": 0.0}, {"shingle_n": 0}],
)
def test_filter_config_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FilterConfig(**kwargs)


def test_filter_degenerate_drops_short_and_loopy_keeps_normal() -> None:
    loopy = "the cat the cat the cat the cat the cat the cat"
    # 12 tokens -> 10 trigrams, only "the cat the" and "cat the cat" unique -> rate 0.8 > 0.5
    samples = [
        Sample(NORMAL),
        Sample("Too short text."),
        Sample(loopy),
        Sample("! ! ! ! ! ! ! ! ! ! ! !"),  # punctuation is not words
        Sample(THIRTY),
    ]
    kept, dropped = filter_degenerate(samples, FilterConfig())
    assert _texts(kept) == [NORMAL, THIRTY]
    assert dropped == 3


# --- dedup ---------------------------------------------------------------------------------


def test_dedup_removes_exact_duplicates_ignoring_case_and_whitespace() -> None:
    first = Sample("Hello  World foo bar baz qux quux corge")
    samples = [first, Sample("hello world FOO bar\nbaz qux  quux corge "), Sample(NORMAL)]
    kept, exact, near = dedup(samples, FilterConfig())
    assert kept[0] is first
    assert _texts(kept) == [first.text, NORMAL]
    assert (exact, near) == (1, 0)


def test_dedup_removes_near_duplicate_keeps_unrelated() -> None:
    tokens = THIRTY.split()
    tokens[15] = "unusual"
    near_copy = " ".join(tokens)
    # one changed word alters 3 of 28 trigrams: Jaccard = 25 / 31 ≈ 0.81 >= 0.7
    unrelated = (
        "in everyday life the river and the fox are the most common sights for ordered "
        "walkers who keep their dogs near the bank"
    )
    samples = [Sample(THIRTY), Sample(near_copy), Sample(unrelated)]
    kept, exact, near = dedup(samples, FilterConfig())
    assert _texts(kept) == [THIRTY, unrelated]
    assert (exact, near) == (0, 1)


def _brute_force_dedup(texts: list[str], cfg: FilterConfig) -> list[str]:
    """O(n²) reference: exact normalised match, then Jaccard against every kept text."""
    seen: set[str] = set()
    kept: list[str] = []
    kept_sh: list[set[tuple[str, ...]]] = []
    for t in texts:
        key = " ".join(t.lower().split())
        if key in seen:
            continue
        seen.add(key)
        sh = set(ngrams(words(t), cfg.shingle_n))
        if any(jaccard(sh, other) >= cfg.dedup_threshold for other in kept_sh):
            continue
        kept.append(t)
        kept_sh.append(sh)
    return kept


def test_dedup_agrees_with_brute_force_reference() -> None:
    rng = random.Random(1234)
    vocab = [f"w{i}" for i in range(60)]
    bases = [" ".join(rng.choice(vocab) for _ in range(30)) for _ in range(80)]
    texts = list(bases)
    for _ in range(120):
        toks = rng.choice(bases).split()
        # 1-4 changed words puts pairs on both sides of 0.7 (1 word ≈ 0.81, 3 scattered ≈ 0.5)
        for _ in range(rng.randint(1, 4)):
            toks[rng.randrange(30)] = rng.choice(vocab)
        if rng.random() < 0.1:
            toks = [t.upper() for t in toks]  # exact duplicate after normalisation
        texts.append(" ".join(toks))
    rng.shuffle(texts)
    cfg = FilterConfig()

    kept, exact, near = dedup([Sample(t) for t in texts], cfg)
    reference = _brute_force_dedup(texts, cfg)
    assert _texts(kept) == reference
    assert exact + near + len(kept) == len(texts)
    # The comparison is only meaningful if both outcomes actually occur.
    assert near > 20
    assert len(kept) > len(bases)


def test_minhash_is_stable_across_processes() -> None:
    root = Path(__file__).resolve().parents[2]
    code = (
        "from worker.rounds import select as s; "
        "print(s._minhash(s._shingles(" + repr(THIRTY) + ", 3))[:4])"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=root,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert outs == {str(sel._minhash(sel._shingles(THIRTY, 3))[:4])}


# --- strategies ----------------------------------------------------------------------------


def _loss(s: Sample) -> float:
    assert s.loss is not None
    return s.loss


def _pool(n: int = 40) -> list[Sample]:
    rng = random.Random(7)
    vocab = [f"v{i}" for i in range(200)]
    return [
        Sample(" ".join(rng.choice(vocab) for _ in range(20)), loss=float(i % 13) + i / 100)
        for i in range(n)
    ]


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_strategy_returns_k_distinct_deterministically(strategy: str) -> None:
    pool = _pool()
    picked = select(pool, 10, strategy, random.Random(3))
    assert len(picked) == 10
    assert len({id(s) for s in picked}) == 10
    assert all(any(s is p for p in pool) for s in picked)
    again = select(pool, 10, strategy, random.Random(3))
    assert [id(s) for s in again] == [id(s) for s in picked]


@pytest.mark.parametrize("fn", [select_random, select_diversity, select_difficulty])
def test_strategy_k_zero_and_negative(fn: Strategy) -> None:
    assert fn(_pool(), 0, random.Random(0)) == []
    with pytest.raises(ValueError):
        fn(_pool(), -1, random.Random(0))


def test_random_caps_at_pool_size() -> None:
    pool = _pool(5)
    assert len(select_random(pool, 50, random.Random(0))) == 5


def test_diversity_prefers_far_apart_texts_over_near_copies() -> None:
    topics = [
        "alpha beta gamma delta epsilon zeta eta theta iota kappa",
        "red orange yellow green blue indigo violet black white grey",
        "one two three four five six seven eight nine ten",
    ]
    samples = []
    for t in topics:
        toks = t.split()
        for j in range(5):
            copy = list(toks)
            copy[j] = f"x{j}"  # near copy: shares most bigrams with its topic
            samples.append(Sample(" ".join(copy)))
    for seed in range(5):
        picked = select_diversity(samples, 3, random.Random(seed))
        topic_of = {samples.index(s) // 5 for s in picked}
        assert topic_of == {0, 1, 2}


def test_difficulty_skips_easy_quartile_and_garbage_tail() -> None:
    samples = [Sample(f"text {i}", loss=float(i)) for i in range(1, 21)]
    # n = 20: easy = lowest 5 (losses 1-5), garbage = top 1 (loss 20),
    # band (descending) = 19, 18, ..., 6 (14 samples).
    # k = 3 takes slice centres at indices 14//6=2, 42//6=7, 70//6=11 -> losses 17, 12, 8
    picked = select_difficulty(samples, 3, random.Random(0))
    assert [s.loss for s in picked] == [17.0, 12.0, 8.0]

    picked = select_difficulty(samples, 14, random.Random(0))
    assert sorted(_loss(s) for s in picked) == [float(x) for x in range(6, 20)]

    # More than the band: fill from the easy band's highest losses first.
    picked = select_difficulty(samples, 16, random.Random(0))
    assert sorted(_loss(s) for s in picked) == [float(x) for x in range(4, 20)]


def test_difficulty_never_returns_lowest_losses_when_enough_others() -> None:
    pool = _pool(40)
    lowest = sorted(pool, key=_loss)[:10]
    for k in (1, 5, 20, 28):
        picked = select_difficulty(pool, k, random.Random(k))
        assert not any(s is low for s in picked for low in lowest)


@pytest.mark.parametrize("bad", [None, float("nan")])
def test_difficulty_requires_losses(bad: float | None) -> None:
    samples = [Sample("a b c", loss=1.0), Sample("d e f", loss=bad)]
    with pytest.raises(ValueError):
        select_difficulty(samples, 1, random.Random(0))
    with pytest.raises(ValueError):
        select(samples, 1, "difficulty", random.Random(0))


def test_unknown_strategy_raises() -> None:
    with pytest.raises(ValueError, match="unknown selection strategy"):
        select(_pool(), 3, "bogus", random.Random(0))


# --- split ---------------------------------------------------------------------------------


def test_split_train_valid() -> None:
    pool = _pool(10)
    train, valid = split_train_valid(pool, 0.2, random.Random(0))
    assert (len(train), len(valid)) == (8, 2)
    assert sorted(map(id, train + valid)) == sorted(map(id, pool))
    again = split_train_valid(pool, 0.2, random.Random(0))
    assert (list(map(id, again[0])), list(map(id, again[1]))) == (
        list(map(id, train)),
        list(map(id, valid)),
    )


def test_split_keeps_one_on_each_side() -> None:
    two = _pool(2)
    assert tuple(map(len, split_train_valid(two, 0.01, random.Random(0)))) == (1, 1)
    assert tuple(map(len, split_train_valid(two, 0.99, random.Random(0)))) == (1, 1)
    assert tuple(map(len, split_train_valid(_pool(1), 0.5, random.Random(0)))) == (1, 0)
    assert split_train_valid([], 0.5, random.Random(0)) == ([], [])
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError):
            split_train_valid(_pool(4), bad, random.Random(0))
