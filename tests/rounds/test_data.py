import json
import random
import re
from pathlib import Path

import pytest

from worker.rounds.data import (
    PYDOC_MIN_CHARS,
    Corpus,
    load_corpus,
    load_documents,
    passages,
    prompts_from,
    real_pool,
    split_corpus,
)


def _words(text: str) -> list[str]:
    return text.split()


# --- loading -------------------------------------------------------------------------------


def test_pydoc_documents_load_deterministically() -> None:
    name, docs = load_documents(None)
    assert name == "pydoc"
    # One document per topic: CPython 3.11 ships 79 topics, all long enough to keep.
    assert len(docs) > 50
    assert all(len(d) >= PYDOC_MIN_CHARS and d == d.strip() for d in docs)
    assert load_documents("pydoc") == (name, docs)


def test_directory_source_reads_txt_and_md_sorted(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("# Bee\n\nbee text\n")
    (tmp_path / "a.txt").write_text("alpha text\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("gamma text")
    (tmp_path / "ignored.py").write_text("print('no')")
    (tmp_path / "empty.txt").write_text("  \n")
    name, docs = load_documents(str(tmp_path))
    assert name == tmp_path.name
    assert docs == ["alpha text", "# Bee\n\nbee text", "gamma text"]


def test_jsonl_source(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": " one "}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_documents(str(path)) == ("docs", ["one", "two"])
    path.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match=":2:"):
        load_documents(str(path))
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_documents(str(path))


def test_plain_file_split_on_form_feed_and_blank_line_runs(tmp_path: Path) -> None:
    path = tmp_path / "book.text"
    path.write_text(
        "first para\n\nstill first doc\n\f\nsecond doc\n\n\nthird doc\n \n\t\n \nfourth doc\n"
    )
    name, docs = load_documents(str(path))
    assert name == "book"
    assert docs == ["first para\n\nstill first doc", "second doc", "third doc", "fourth doc"]


def test_missing_and_empty_sources_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_documents(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no documents"):
        load_documents(str(tmp_path))  # an empty directory
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n\n\n")
    with pytest.raises(ValueError, match="no documents"):
        load_documents(str(blank))


# --- splitting -----------------------------------------------------------------------------


def _check_split(corpus: Corpus, docs: list[str]) -> None:
    train, dev, test = set(corpus.train), set(corpus.dev), set(corpus.test)
    assert not (train & dev) and not (train & test) and not (dev & test)
    assert train | dev | test == set(docs)
    assert len(corpus.train) + len(corpus.dev) + len(corpus.test) == len(set(docs))


def test_default_corpus_split_is_disjoint_complete_and_deterministic() -> None:
    _, docs = load_documents(None)
    corpus = load_corpus()
    _check_split(corpus, docs)
    assert corpus.name == "pydoc"
    assert corpus.dev and corpus.test
    assert len(corpus.train) > len(corpus.dev) + len(corpus.test)
    assert load_corpus() == corpus
    assert load_corpus(seed=99) != corpus


@pytest.mark.parametrize("n", [3, 4, 7, 20, 101])
def test_every_split_non_empty_from_three_documents(n: int) -> None:
    docs = [f"document number {i}" for i in range(n)]
    corpus = split_corpus("t", docs, seed=5)
    _check_split(corpus, docs)
    assert corpus.train and corpus.dev and corpus.test
    # Within a split the input order is kept.
    for part in (corpus.train, corpus.dev, corpus.test):
        assert part == sorted(part, key=docs.index)


def test_fractions_are_respected_roughly() -> None:
    docs = [f"d{i}" for i in range(200)]
    corpus = split_corpus("t", docs, dev_fraction=0.1, test_fraction=0.2)
    assert (len(corpus.train), len(corpus.dev), len(corpus.test)) == (140, 20, 40)


def test_small_corpora_and_bad_fractions() -> None:
    assert split_corpus("t", ["only"]) == Corpus("t", ["only"], [], [])
    two = split_corpus("t", ["a", "b"])
    assert len(two.train) == 1 and len(two.dev) == 1 and two.test == []
    with pytest.raises(ValueError):
        split_corpus("t", [])
    with pytest.raises(ValueError):
        split_corpus("t", ["a", "b", "c"], dev_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError):
        split_corpus("t", ["a", "b", "c"], dev_fraction=0.0)


def test_duplicate_documents_cannot_straddle_splits() -> None:
    docs = ["same text"] * 5 + [f"other {i}" for i in range(10)]
    corpus = split_corpus("t", docs)
    assert sum(d == "same text" for d in corpus.train + corpus.dev + corpus.test) == 1
    _check_split(corpus, docs)


# --- passages and prompts ------------------------------------------------------------------


def test_passages_respect_max_words_and_keep_every_word_in_order() -> None:
    _, docs = load_documents(None)
    chunks = passages(docs[:10], max_words=60)
    assert all(0 < len(_words(p)) <= 60 for p in chunks)
    assert [w for p in chunks for w in _words(p)] == [w for d in docs[:10] for w in _words(d)]
    # Passages are cut from the original text, never re-joined with other whitespace.
    assert all(any(p in d for d in docs[:10]) for p in chunks)


def test_passages_prefer_paragraph_then_sentence_boundaries() -> None:
    para = " ".join(f"w{i}" for i in range(49)) + "."  # 50 words
    doc = "\n\n".join([para, para.upper(), para + " end."])
    chunks = passages([doc], max_words=110)
    assert chunks == [para + "\n\n" + para.upper(), para + " end."]
    sentences = "One two three four. Five six seven. Eight nine ten eleven twelve."
    assert passages([sentences], max_words=8) == [
        "One two three four. Five six seven.",
        "Eight nine ten eleven twelve.",
    ]
    long_sentence = " ".join(str(i) for i in range(25))
    assert [len(_words(p)) for p in passages([long_sentence], max_words=10)] == [10, 10, 5]


def test_passages_keep_code_lines_and_shuffle_with_rng() -> None:
    code = "\n".join(f"    x{i} = {i}" for i in range(30))
    chunks = passages(["Intro text.\n\n" + code], max_words=20)
    assert all(len(_words(p)) <= 20 for p in chunks)
    assert "\n    x" in chunks[1]  # split at lines: indentation inside the passage survives
    docs = [f"doc {i} has words" for i in range(20)]
    plain = passages(docs)
    shuffled = passages(docs, rng=random.Random(3))
    assert sorted(shuffled) == sorted(plain) and shuffled != plain
    assert passages(docs, rng=random.Random(3)) == shuffled
    with pytest.raises(ValueError):
        passages(docs, max_words=0)


def test_prompts_are_openings_of_the_given_documents_only() -> None:
    corpus = load_corpus()
    prompts = prompts_from(corpus.train, 40, random.Random(0))
    assert len(prompts) == 40
    assert len(set(prompts)) == 40  # enough passages: no passage reused
    for p in prompts:
        assert 8 <= len(_words(p)) <= 16
        assert any(p in doc for doc in corpus.train)
    assert prompts_from(corpus.train, 40, random.Random(0)) == prompts


def test_prompts_reuse_passages_evenly_when_too_few() -> None:
    docs = [
        "alpha beta gamma delta epsilon zeta eta theta iota kappa",
        "one two three four five six seven eight nine ten eleven",
        "tiny",
    ]
    prompts = prompts_from(docs, 7, random.Random(1), min_words=2, max_words=4)
    assert len(prompts) == 7
    starts = [p.split()[0] for p in prompts]
    # "tiny" is shorter than min_words and longer passages exist, so it is never used.
    assert set(starts) == {"alpha", "one"}
    assert abs(starts.count("alpha") - starts.count("one")) <= 1
    for p in prompts:
        assert 2 <= len(p.split()) <= 4 and re.match(r"^(alpha|one) ", p)
    assert prompts_from(["tiny"], 2, random.Random(0)) == ["tiny", "tiny"]
    assert prompts_from(docs, 0, random.Random(0)) == []
    with pytest.raises(ValueError):
        prompts_from([], 1, random.Random(0))
    with pytest.raises(ValueError):
        prompts_from(docs, 1, random.Random(0), min_words=5, max_words=4)


def test_real_pool_is_a_fixed_sample_in_document_order() -> None:
    docs = [" ".join(f"d{d}w{i}" for i in range(40)) + "." for d in range(30)]
    every = passages(docs)
    assert real_pool(docs, None) == every == real_pool(docs, len(every) + 5)
    few = real_pool(docs, 5)
    assert len(few) == 5 and len(set(few)) == 5
    assert few == real_pool(docs, 5)  # the same pool every call (a lineage's every round)
    assert [every.index(x) for x in few] == sorted(every.index(x) for x in few)
    assert few != every[:5]  # sampled over the whole split, not its first documents
