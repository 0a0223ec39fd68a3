import dataclasses

import pytest

from worker.rounds.textstats import (
    DiversityStats,
    distinct_n,
    diversity,
    jaccard,
    mean_repetition_rate,
    ngrams,
    repetition_rate,
    words,
)


def test_words_lowercases_and_splits_punctuation() -> None:
    assert words("Hello, World! hello") == ["hello", ",", "world", "!", "hello"]
    assert words("  \n\t ") == []


def test_ngrams() -> None:
    assert ngrams(["a", "b", "c"], 2) == [("a", "b"), ("b", "c")]
    assert ngrams(["a", "b", "c"], 3) == [("a", "b", "c")]
    assert ngrams(["a", "b"], 3) == []
    with pytest.raises(ValueError):
        ngrams(["a"], 0)


def test_distinct_n_hand_computed() -> None:
    texts = ["a b a b", "a c"]
    # unigrams: a b a b | a c -> 6 total, unique {a, b, c} = 3 -> 3/6
    assert distinct_n(texts, 1) == pytest.approx(0.5)
    # bigrams (never across texts): ab ba ab | ac -> 4 total, unique {ab, ba, ac} = 3 -> 3/4
    assert distinct_n(texts, 2) == pytest.approx(0.75)


def test_distinct_n_without_ngrams_is_zero() -> None:
    assert distinct_n([], 1) == 0.0
    assert distinct_n(["one"], 2) == 0.0


def test_repetition_rate_hand_computed() -> None:
    # tokens a b c a b c a -> trigrams abc bca cab abc bca: 5 total, 3 unique -> 1 - 3/5
    assert repetition_rate("a b c a b c a") == pytest.approx(0.4)
    # the cat sat / cat sat on / sat on the / on the mat: all unique
    assert repetition_rate("the cat sat on the mat") == 0.0
    # unigrams: 6 tokens, "the" twice -> 5 unique -> 1 - 5/6
    assert repetition_rate("the cat sat on the mat", n=1) == pytest.approx(1 / 6)
    # fewer tokens than n: no n-grams at all
    assert repetition_rate("a b") == 0.0


def test_mean_repetition_rate() -> None:
    # (0.4 + 0.0) / 2
    assert mean_repetition_rate(["a b c a b c a", "x y z"]) == pytest.approx(0.2)
    assert mean_repetition_rate([]) == 0.0


def test_jaccard() -> None:
    # intersection {2, 3}, union {1, 2, 3, 4} -> 2/4
    assert jaccard({1, 2, 3}, {2, 3, 4}) == pytest.approx(0.5)
    assert jaccard({1}, {1}) == 1.0
    assert jaccard(set(), {1}) == 0.0
    assert jaccard(set(), set()) == 0.0


def test_diversity_hand_computed() -> None:
    texts = ["a b c a b c a", "a c"]
    stats = diversity(texts)
    # unigrams: 7 + 2 = 9 tokens, unique {a, b, c} -> 3/9
    assert stats.distinct_1 == pytest.approx(1 / 3)
    # bigrams: ab bc ca ab bc ca | ac -> 7 total, unique {ab, bc, ca, ac} -> 4/7
    assert stats.distinct_2 == pytest.approx(4 / 7)
    # trigram repetition: (0.4 + 0.0) / 2
    assert stats.repetition_rate == pytest.approx(0.2)


def test_diversity_stats_is_frozen() -> None:
    stats = DiversityStats(distinct_1=1.0, distinct_2=1.0, repetition_rate=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.distinct_1 = 0.5  # type: ignore[misc]
