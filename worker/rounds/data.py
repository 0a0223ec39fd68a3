"""The domain corpus a round draws its real text from.

The corpus is split by *document* into train (prompts, replay text), dev (chooses ε and gates
promotion) and test (only measured and reported). Splitting by document rather than by
passage keeps near-identical neighbouring passages of one document from landing on both
sides of the train/held-out boundary.

The default source is the Python documentation topics shipped with CPython
(``pydoc_data.topics``): always installed, real English prose mixed with code, and the same
on every machine with the same Python, so the default corpus needs no download.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core import datafiles

__all__ = [
    "PYDOC_MIN_CHARS",
    "Corpus",
    "load_corpus",
    "load_documents",
    "load_prompt_file",
    "passages",
    "prompts_from",
    "real_pool",
    "split_corpus",
]

log = logging.getLogger(__name__)

# pydoc topics shorter than this are cross-reference stubs with little text to model.
PYDOC_MIN_CHARS = 200
# Rounds, the study and benchmarks split the domain corpus with this seed, so "test" is
# the same held-out text everywhere.
SPLIT_SEED = 1234
EVAL_SAMPLE_SEED = 4321
# `train_passages`' sample of the train split: one seed for every round, so a lineage's rounds
# all see the same (small) real text.
POOL_SEED = 2468
_DIR_SUFFIXES = (".txt", ".md")

# A document separator in a plain text file: a line holding only a form feed, or a run of
# two or more blank lines (one blank line is an ordinary paragraph break).
_DOC_SEPARATOR = re.compile(r"^[ \t]*\f[ \t\f]*$|\n(?:[ \t]*\n){2,}", re.MULTILINE)

# Boundaries tried in order when a passage is too long: paragraphs, lines, sentences, words.
# Earlier levels keep more structure (code blocks stay intact when split at lines).
_LEVELS: tuple[re.Pattern[str], ...] = (
    re.compile(r"\n[ \t]*\n\s*"),
    re.compile(r"\n"),
    re.compile(r"(?<=[.!?])\s+"),
    re.compile(r"\s+"),
)
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Corpus:
    """A named corpus split by document. Each entry is one whole document."""

    name: str
    train: list[str]
    dev: list[str]
    test: list[str]


def _pydoc_documents() -> list[str]:
    from pydoc_data.topics import topics

    # Sorted by key so the document order, and therefore the seeded split, does not depend
    # on dict ordering in the generated module.
    docs = [topics[key].strip() for key in sorted(topics)]
    return [d for d in docs if len(d) >= PYDOC_MIN_CHARS]


def _read(path: Path, max_bytes: int = datafiles.MAX_FILE_BYTES) -> str:
    # Regular files only (a FIFO would hang the worker), at most max_bytes.
    return datafiles.read_text(path, max_bytes)


def _jsonl_documents(path: Path, max_bytes: int = datafiles.MAX_FILE_BYTES) -> list[str]:
    docs: list[str] = []
    for lineno, line in enumerate(_read(path, max_bytes).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(f'{path}:{lineno}: expected an object with a string "text" field')
        docs.append(text.strip())
    return docs


def load_documents(
    source: str | None, root: Path | None = None, max_bytes: int = datafiles.MAX_FILE_BYTES
) -> tuple[str, list[str]]:
    """Read a corpus source into ``(name, documents)``.

    ``None`` or ``"pydoc"``: CPython's documentation topics, one document per topic. A
    directory: every ``*.txt`` / ``*.md`` file below it (sorted by relative path) is one
    document. A ``.jsonl`` file: the ``"text"`` field of each line. Any other file: documents
    separated by a line holding only ``\\f`` or by two or more blank lines.

    With ``root`` (what rounds pass: the operator's round data directory) ``source`` is a
    data *name* resolved inside it (:mod:`core.datafiles`); without it, a trusted local path
    (benchmarks, tests). Either way only regular files are read, each up to ``max_bytes``.

    Raises ``ValueError`` when the path does not exist or yields no documents.
    """
    if source is None or source == "pydoc":
        name, docs = "pydoc", _pydoc_documents()
    else:
        if root is not None:
            path = datafiles.resolve(root, source)
        else:
            path = Path(source).expanduser()
            if not path.exists():
                raise ValueError(f"corpus source {source!r} does not exist")
        if path.is_dir():
            files = datafiles.regular_files(path, _DIR_SUFFIXES)
            name, docs = path.name, [_read(p, max_bytes).strip() for p in files]
        elif path.suffix == ".jsonl":
            name, docs = path.stem, _jsonl_documents(path, max_bytes)
        else:
            text = _read(path, max_bytes)
            name, docs = path.stem, [d.strip() for d in _DOC_SEPARATOR.split(text)]
        docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"corpus source {source or 'pydoc'!r} contains no documents")
    log.debug("corpus %s: %d documents", name, len(docs))
    return name, docs


def load_prompt_file(root: Path, name: str, limit: int, max_bytes: int) -> list[str]:
    """The first `limit` non-empty lines of data file `name` in the round data directory."""
    path = datafiles.resolve(root, name)
    lines = [x.strip() for x in _read(path, max_bytes).splitlines()]
    return [x for x in lines if x][:limit]


def split_corpus(
    name: str,
    docs: Sequence[str],
    seed: int = 1234,
    dev_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> Corpus:
    """Split documents into disjoint train / dev / test lists, deterministically from ``seed``.

    Exact duplicate documents are kept once, so one text cannot sit in train and in a
    held-out split. With three or more distinct documents every split gets at least one;
    with fewer, train is filled first, then dev. Within a split the input order is kept.
    """
    if not (0.0 < dev_fraction < 1.0 and 0.0 < test_fraction < 1.0):
        raise ValueError("dev_fraction and test_fraction must be in (0, 1)")
    if dev_fraction + test_fraction >= 1.0:
        raise ValueError("dev_fraction + test_fraction must leave documents for train")
    unique = list(dict.fromkeys(docs))
    if len(unique) < len(docs):
        log.info("corpus %s: dropped %d duplicate documents", name, len(docs) - len(unique))
    n = len(unique)
    if n == 0:
        raise ValueError(f"corpus {name!r} has no documents to split")
    if n >= 3:
        n_test = max(1, round(n * test_fraction))
        n_dev = max(1, round(n * dev_fraction))
        # Rounding both up can starve train on tiny corpora; take the excess from the larger.
        while n_test + n_dev > n - 1:
            if n_test >= n_dev:
                n_test -= 1
            else:
                n_dev -= 1
    else:
        log.warning(
            "corpus %s has %d documents: no test split%s", name, n, "" if n == 2 else "/dev"
        )
        n_test, n_dev = 0, n - 1
    order = list(range(n))
    random.Random(seed).shuffle(order)
    test_idx = sorted(order[:n_test])
    dev_idx = sorted(order[n_test : n_test + n_dev])
    train_idx = sorted(order[n_test + n_dev :])
    return Corpus(
        name=name,
        train=[unique[i] for i in train_idx],
        dev=[unique[i] for i in dev_idx],
        test=[unique[i] for i in test_idx],
    )


def load_corpus(
    source: str | None = None,
    seed: int = 1234,
    dev_fraction: float = 0.15,
    test_fraction: float = 0.15,
    root: Path | None = None,
    max_bytes: int = datafiles.MAX_FILE_BYTES,
) -> Corpus:
    """:func:`load_documents` then :func:`split_corpus`."""
    name, docs = load_documents(source, root, max_bytes)
    return split_corpus(name, docs, seed, dev_fraction, test_fraction)


def _word_count(text: str) -> int:
    return len(text.split())


def _chunk(text: str, start: int, end: int, max_words: int, level: int) -> list[tuple[int, int]]:
    """Spans of ``text[start:end]`` of at most ``max_words`` words each.

    Split at the coarsest boundary that brings each piece under ``max_words``, then pack
    neighbouring pieces greedily back up to ``max_words``. Spans index the original text,
    so a passage keeps its spacing and is always a literal substring of its document.
    """
    words = _word_count(text[start:end])
    if words <= max_words:
        return [(start, end)] if words else []
    pieces: list[tuple[int, int]] = []
    pos = start
    for match in _LEVELS[level].finditer(text, start, end):
        pieces.append((pos, match.start()))
        pos = match.end()
    pieces.append((pos, end))
    spans: list[tuple[int, int]] = []
    for s, e in pieces:
        if _word_count(text[s:e]) > max_words:
            # The word level yields single words, so recursion always terminates there.
            spans.extend(_chunk(text, s, e, max_words, level + 1))
        elif text[s:e].strip():
            spans.append((s, e))
    # Separators are whitespace only, so a packed span's word count is the sum of its parts.
    out: list[tuple[int, int]] = []
    current_words = 0
    for s, e in spans:
        n = _word_count(text[s:e])
        if out and current_words + n <= max_words:
            out[-1] = (out[-1][0], e)
            current_words += n
        else:
            out.append((s, e))
            current_words = n
    return out


def passages(
    docs: Sequence[str], max_words: int = 160, rng: random.Random | None = None
) -> list[str]:
    """Chunk documents into passages of at most ``max_words`` words.

    Boundaries are paragraphs where possible, then lines, then sentences, and words only for
    a sentence longer than ``max_words``. Bounded passages keep replay and evaluation
    sequences short enough to batch. A passage never spans two documents. The result is in
    document order, or shuffled with ``rng`` when one is given.
    """
    if max_words < 1:
        raise ValueError("max_words must be at least 1")
    out: list[str] = []
    for doc in docs:
        out.extend(doc[s:e].strip() for s, e in _chunk(doc, 0, len(doc), max_words, 0))
    out = [p for p in out if p]
    if rng is not None:
        rng.shuffle(out)
    return out


def _opening(text: str, k: int) -> str:
    # Slice the original text rather than re-joining words so the prompt keeps its spacing
    # and newlines and is literally a prefix of the source passage.
    ends = [m.end() for m in _WORD.finditer(text)]
    return text[: ends[min(k, len(ends)) - 1]] if ends else ""


def prompts_from(
    docs: Sequence[str],
    n: int,
    rng: random.Random,
    min_words: int = 8,
    max_words: int = 16,
) -> list[str]:
    """``n`` prompts: the first k words (k uniform in [min_words, max_words]) of passages.

    Passages are drawn without replacement until all have been used, then in further
    shuffled passes, so with enough passages every prompt has a distinct source and with
    too few each passage is used about equally often. Passages shorter than ``min_words``
    are used only when there are no longer ones.
    """
    if n < 0:
        raise ValueError("n must be non-negative")
    if not 1 <= min_words <= max_words:
        raise ValueError("need 1 <= min_words <= max_words")
    if n == 0:
        return []
    pool = passages(docs)
    long_enough = [p for p in pool if _word_count(p) >= min_words]
    pool = long_enough or pool
    if not pool:
        raise ValueError("no text to draw prompts from")
    chosen: list[str] = []
    while len(chosen) < n:
        batch = list(pool)
        rng.shuffle(batch)
        chosen.extend(batch[: n - len(chosen)])
    return [_opening(p, rng.randint(min_words, max_words)) for p in chosen]


def eval_sample(docs: Sequence[str], n: int, max_words: int = 160) -> list[str]:
    """A fixed, seeded sample of `n` passages spread over all documents.

    The first n passages in document order would cover only a few documents; a seeded
    sample gives every round the same, representative held-out set.
    """
    pool = passages(docs, max_words=max_words)
    if len(pool) <= n:
        return pool
    return random.Random(EVAL_SAMPLE_SEED).sample(pool, n)


def real_pool(train_docs: Sequence[str], n: int | None) -> list[str]:
    """The train-split passages a round draws prompts and replay text from: all of them, or
    a fixed seeded sample of ``n`` (kept in document order) when ``n`` is smaller."""
    pool = passages(train_docs)
    if n is None or n >= len(pool):
        return pool
    keep = sorted(random.Random(POOL_SEED).sample(range(len(pool)), n))
    return [pool[i] for i in keep]
