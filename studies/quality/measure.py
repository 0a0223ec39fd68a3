"""How the quality study measures a champion: evaluation sets and the measurement itself.

The domain test split and an unrelated real corpus (perplexity), and a fixed prompt set from
the domain train split (diversity of samples). Identical for every arm and round.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_UNRELATED = "/usr/share/common-licenses"
PROMPT_SEED = 4242  # the fixed diversity prompt set, the same for every arm and round


@dataclass(frozen=True)
class MeasureConfig:
    """How the study measures a champion; identical for every arm and round."""

    test_passages: int  # 0: every passage of the test split
    unrelated_passages: int  # 0: every passage of the unrelated corpus
    diversity_prompts: int
    max_new_tokens: int
    temperature: float = 0.8
    top_p: float = 0.95
    batch_size: int = 8
    max_length: int = 256
    seed: int = 7


FULL_MEASURE = MeasureConfig(
    test_passages=0, unrelated_passages=96, diversity_prompts=128, max_new_tokens=48
)
SMALL_MEASURE = MeasureConfig(
    test_passages=4,
    unrelated_passages=4,
    diversity_prompts=3,
    max_new_tokens=8,
    batch_size=4,
    max_length=64,
)

# --------------------------------------------------------------------------- evaluation sets


@dataclass(frozen=True)
class EvalSets:
    test: list[str]
    unrelated: list[str]
    prompts: list[str]
    info: dict[str, Any]


def load_unrelated_documents(source: str) -> tuple[str, list[str]]:
    """A directory: every regular, non-hidden file below it is one document (symlinks and
    identical copies counted once; files with NUL bytes skipped). A file: read as a corpus
    file (``.jsonl``, or documents separated by form feeds / two blank lines)."""
    from worker.rounds.data import load_documents

    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(
            f"unrelated corpus {source!r} does not exist; pass --unrelated PATH "
            "(a directory of text files, a .jsonl file or a plain text file)"
        )
    if path.is_file():
        return load_documents(str(path))
    seen: set[Path] = set()
    docs: list[str] = []
    for p in sorted(path.rglob("*"), key=lambda q: q.relative_to(path).as_posix()):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(path).parts):
            continue
        real = p.resolve()
        if real in seen:
            continue
        seen.add(real)
        raw = p.read_bytes()
        if b"\x00" in raw:
            continue
        text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n").strip()
        if text:
            docs.append(text)
    docs = list(dict.fromkeys(docs))
    if not docs:
        raise ValueError(f"unrelated corpus {source!r} holds no text files")
    return path.name, docs


def _take(texts: list[str], n: int, seed: int) -> list[str]:
    """All texts (n == 0) in order, or a seeded sample of n spread over the whole corpus."""
    if n <= 0 or n >= len(texts):
        return list(texts)
    picked = sorted(random.Random(seed).sample(range(len(texts)), n))
    return [texts[i] for i in picked]


def build_eval_sets(domain: str | None, unrelated: str, cfg: MeasureConfig) -> EvalSets:
    from worker.rounds.data import SPLIT_SEED, load_corpus, passages, prompts_from

    corpus = load_corpus(domain, seed=SPLIT_SEED)
    test_all = passages(corpus.test)
    test = _take(test_all, cfg.test_passages, SPLIT_SEED)
    u_name, u_docs = load_unrelated_documents(unrelated)
    u_all = passages(u_docs)
    unrel = _take(u_all, cfg.unrelated_passages, SPLIT_SEED)
    prompts = prompts_from(corpus.train, cfg.diversity_prompts, random.Random(PROMPT_SEED))
    if not test:
        raise ValueError(f"domain corpus {corpus.name!r} has no test split (too few documents)")
    real = real_text_diversity(test)
    info = {
        "domain_name": corpus.name,
        "split_seed": SPLIT_SEED,
        "domain_docs": {
            "train": len(corpus.train),
            "dev": len(corpus.dev),
            "test": len(corpus.test),
        },
        "test_passages": len(test),
        "test_passages_total": len(test_all),
        "unrelated_name": u_name,
        "unrelated_docs": len(u_docs),
        "unrelated_passages": len(unrel),
        "unrelated_passages_total": len(u_all),
        "diversity_prompts": len(prompts),
        "prompt_seed": PROMPT_SEED,
        # The same statistics on real text of about a sample's length: what "diverse" and
        # "repetitive" look like in this domain (reference text repeats its own syntax).
        "real_distinct_2": real["distinct_2"],
        "real_repetition_rate": real["repetition_rate"],
    }
    return EvalSets(test=test, unrelated=unrel, prompts=prompts, info=info)


def real_text_diversity(texts: list[str], skip: int = 12, length: int = 36) -> dict[str, float]:
    """distinct-2 and repetition of real text cut like the probe's samples: the ``length``
    words (≈ 48 tokens) after a prompt-sized opening of ``skip`` words of each passage."""
    from worker.rounds.textstats import diversity

    cut = [" ".join(t.split()[skip : skip + length]) for t in texts]
    d = diversity([c for c in cut if c])
    return {"distinct_2": d.distinct_2, "repetition_rate": d.repetition_rate}


def measure(path: Path, device_name: str, sets: EvalSets, cfg: MeasureConfig) -> dict[str, Any]:
    import torch

    from core.modeling.device import pick_device
    from core.modeling.loader import load_checkpoint
    from worker.rounds.evaluate import perplexity
    from worker.rounds.generate import generate_samples
    from worker.rounds.textstats import diversity

    started = time.perf_counter()
    loaded = load_checkpoint(path, pick_device(device_name), torch.float32)
    model, tok = loaded.model, loaded.tokenizer
    test = perplexity(model, tok, sets.test, cfg.batch_size, cfg.max_length)
    unrel = perplexity(model, tok, sets.unrelated, cfg.batch_size, cfg.max_length)
    gen = generate_samples(
        model,
        tok,
        sets.prompts,
        1,
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.top_p,
        cfg.seed,
        16,
    )
    div = diversity([s.text for s in gen.samples])
    del model, loaded
    return {
        "test_ppl": test.ppl,
        "test_tokens": test.tokens,
        "unrelated_ppl": unrel.ppl,
        "unrelated_tokens": unrel.tokens,
        "distinct_1": div.distinct_1,
        "distinct_2": div.distinct_2,
        "repetition_rate": div.repetition_rate,
        "diversity_tokens": gen.tokens,
        "measure_seconds": time.perf_counter() - started,
    }


MEASURE_FIELDS = (
    "test_ppl",
    "test_tokens",
    "unrelated_ppl",
    "unrelated_tokens",
    "distinct_1",
    "distinct_2",
    "repetition_rate",
    "diversity_tokens",
    "measure_seconds",
)
