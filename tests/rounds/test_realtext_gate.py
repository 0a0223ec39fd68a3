"""The diversity gate against real held-out text: blocks degenerate candidates, passes the base."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from core.modeling.loader import LoadedBase, load_base
from worker.rounds.data import load_corpus
from worker.rounds.decide import DiversityCheck, decide
from worker.rounds.diversity_gate import Probe
from worker.rounds.realtext import RealTextCache, real_continuations
from worker.rounds.textstats import DiversityStats

BASE = DiversityStats(distinct_1=0.3, distinct_2=0.75, repetition_rate=0.06)
REAL = DiversityStats(distinct_1=0.35, distinct_2=0.78, repetition_rate=0.04)


def stats(d2: float, rep: float) -> DiversityStats:
    return DiversityStats(distinct_1=0.3, distinct_2=d2, repetition_rate=rep)


def check(cand: DiversityStats, real: DiversityStats | None = REAL) -> DiversityCheck:
    return DiversityCheck(
        parent=BASE, candidate=cand, tolerance=0.05, base=BASE, real=real, real_tolerance=0.03
    )


def test_the_base_itself_passes_and_small_moves_pass() -> None:
    assert check(BASE).failures() == []
    assert check(stats(0.76, 0.05)).failures() == []  # toward real text
    assert decide("dev", 20, 19, 0.0, check(stats(0.74, 0.062))).promote


def test_word_salad_is_blocked_only_by_the_real_text_comparison() -> None:
    salad = stats(0.98, 0.0)  # "more diverse" than the base: the one-sided checks pass it
    assert check(salad, real=None).failures() == []
    d = decide("dev", 20, 19, 0.0, check(salad))
    assert not d.promote and "above real held-out text's 0.780" in d.reason


def test_repetitive_samples_are_blocked_against_real_text() -> None:
    fails = check(stats(0.75, 0.10)).real_failures()  # +0.06 repetition vs the base's 0.02 gap
    assert len(fails) == 1 and fails[0].startswith("repetition 0.100")


@pytest.fixture(scope="module")
def tiny() -> LoadedBase:
    return load_base("tiny:llama")


def _stuck(model: Any, token: int) -> Any:
    """A deliberately broken copy: its lm_head always favours one token."""
    broken = copy.deepcopy(model)

    def hook(_m: Any, _inp: Any, out: Any) -> Any:
        out[..., token] += 1e4
        return out

    broken.get_output_embeddings().register_forward_hook(hook)
    return broken


def test_probe_of_a_broken_candidate_fails_and_the_base_passes(
    tiny: LoadedBase, tmp_path: Path
) -> None:
    tok = tiny.tokenizer
    corpus = load_corpus(None)
    probe = Probe.from_train(corpus.train, 12, 16, 0.8, 0.95, 12)
    cache = RealTextCache(tmp_path)
    real = cache.measure(corpus.dev, tok, 12, 16)
    assert real is not None and 0.5 < real.distinct_2 <= 1 and real.repetition_rate < 0.2
    assert json.loads((tmp_path / "realtext.json").read_text())  # cached
    assert cache.measure(corpus.dev, tok, 12, 16) == real
    base = probe.run(tiny.model, tok)
    the = tok(" the", add_special_tokens=False)["input_ids"][0]
    broken = probe.run(_stuck(tiny.model, the), tok)
    assert broken.repetition_rate > 0.5

    def gate(cand: DiversityStats) -> DiversityCheck:
        return DiversityCheck(base, cand, 1.0, None, 1.0, real, 0.03)  # only the real check

    assert gate(base).failures() == []
    assert any("real held-out text" in f for f in gate(broken).failures())


def test_real_continuations_match_the_probe_in_count_and_length(tiny: LoadedBase) -> None:
    tok = tiny.tokenizer
    dev = load_corpus(None).dev
    texts = real_continuations(dev, tok, 20, 16)
    assert len(texts) == 20
    assert all(0 < len(tok(t, add_special_tokens=False)["input_ids"]) <= 17 for t in texts)
    assert real_continuations(dev, tok, 20, 16) == texts  # fixed draw
