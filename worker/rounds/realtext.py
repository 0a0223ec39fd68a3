"""Diversity of real held-out domain text, as the decide stage's probe would see it.

The probe (:mod:`worker.rounds.diversity_gate`) samples one continuation of ``max_new_tokens``
tokens after each of ``n`` prompts (8–16 opening words of a train passage). The real-text
counterpart takes ``n`` dev-split passages, skips an opening of 8–16 words the same way and
keeps the next ``max_new_tokens`` tokens (the model's tokenizer), so both sides have the same
number of texts of the same length: distinct-2 is a corpus-level ratio and falls as the text
grows, so only like-sized sets compare.

The numbers depend on the corpus's dev split, the tokenizer and the probe's size only, so
they are computed once and cached in ``<checkpoint_dir>/<lineage>/realtext.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker.rounds.data import passages
from worker.rounds.stats_file import StatsFile
from worker.rounds.textstats import DiversityStats, diversity

__all__ = ["REAL_SEED", "RealTextCache", "real_continuations", "real_diversity"]

log = logging.getLogger(__name__)

REAL_SEED = 8642  # the draw of dev passages and of their skipped openings; fixed
CACHE_FILE = "realtext.json"
_MIN_WORDS, _MAX_WORDS = 8, 16  # the probe's prompt lengths (data.prompts_from)


def real_continuations(dev_docs: Sequence[str], tokenizer: Any, n: int, tokens: int) -> list[str]:
    """``n`` real continuations of about ``tokens`` tokens each from the dev split."""
    pool = [p for p in passages(dev_docs) if len(p.split()) > _MIN_WORDS]
    if not pool or n < 1:
        return []
    rng = random.Random(REAL_SEED)
    chosen: list[str] = []
    while len(chosen) < n:  # without replacement until the pool is used up, as prompts are
        batch = list(pool)
        rng.shuffle(batch)
        chosen.extend(batch[: n - len(chosen)])
    out: list[str] = []
    for text in chosen:
        skip = rng.randint(_MIN_WORDS, _MAX_WORDS)
        rest = " ".join(text.split()[skip:])  # whitespace-joined: stats tokenise words anyway
        ids = tokenizer(rest, add_special_tokens=False)["input_ids"][:tokens]
        out.append(tokenizer.decode(ids, skip_special_tokens=True))
    return out


def real_diversity(dev_docs: Sequence[str], tokenizer: Any, n: int, tokens: int) -> DiversityStats:
    """Distinct-1/2 and trigram repetition of :func:`real_continuations`."""
    return diversity(real_continuations(dev_docs, tokenizer, n, tokens))


def _key(dev_docs: Sequence[str], tokenizer: Any, n: int, tokens: int) -> str:
    h = hashlib.sha256()
    for doc in dev_docs:
        h.update(hashlib.sha256(doc.encode()).digest())
    # The vocabulary, not the tokenizer's path: each promoted checkpoint loads its (identical)
    # tokenizer from its own directory.
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    body = [h.hexdigest(), vocab.hexdigest(), n, tokens, REAL_SEED]
    return hashlib.sha256(json.dumps(body).encode()).hexdigest()[:16]


class RealTextCache:
    """``{"<key>": {distinct_1, distinct_2, repetition_rate}}`` on disk, one file per lineage."""

    def __init__(self, lineage_dir: Path) -> None:
        self.path = lineage_dir / CACHE_FILE
        self._file = StatsFile(self.path)

    def measure(
        self, dev_docs: Sequence[str], tokenizer: Any, n: int, tokens: int
    ) -> DiversityStats | None:
        """The cached numbers, or computed and cached; None for an empty dev split."""
        key = _key(dev_docs, tokenizer, n, tokens)
        cached = self._file.get(key)
        if cached is not None:
            return cached
        texts = real_continuations(dev_docs, tokenizer, n, tokens)
        if not texts:
            return None
        stats = diversity(texts)
        self._file.put(key, stats)
        return stats
