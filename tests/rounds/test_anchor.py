"""KL anchor: the term changes the update and keeps it nearer the base on the anchored text."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from core.modeling.loader import LoadedBase, load_base
from worker.rounds.anchor import build_anchor
from worker.rounds.data import load_corpus, passages
from worker.rounds.evaluate import encode_texts
from worker.rounds.update import TrainConfig, finetune

SYNTH = ["The cat sat on the mat. The cat sat on the mat. The cat sat on the mat."] * 4


@pytest.fixture(scope="module")
def tiny() -> LoadedBase:
    return load_base("tiny:llama")


def test_anchor_keeps_the_update_nearer_the_base(tiny: LoadedBase) -> None:
    tok = tiny.tokenizer
    pool = passages(load_corpus(None).train)
    replay = [r[:40] for r in encode_texts(tok, pool[:8])]
    other = [r[:40] for r in encode_texts(tok, pool[100:116])]
    rows = encode_texts(tok, SYNTH) + replay
    cfg = TrainConfig(learning_rate=3e-3, epochs=3, batch_size=4, max_length=40, seed=1)
    # A base with peaked predictions on the domain (a random init spreads its mass over the
    # whole vocabulary, so no top-k holds much of it): the tiny model trained on the text.
    base = copy.deepcopy(tiny.model)
    finetune(base, tok, other + replay, [], TrainConfig(learning_rate=3e-3, epochs=4, batch_size=8))
    # The NLL on the same rows pulls away from the base too, so the pull shows at a high weight
    # (measured: weight 5 → KL −2%, weight 50 → −43%).
    anchor = build_anchor(base, replay, 40, weight=50.0, top_k=64, batch_size=4)
    assert anchor.tokens == sum(len(r) - 1 for r in replay)
    assert anchor.mean_kl(base) == pytest.approx(0.0, abs=1e-4)  # ≥ 0 and 0 at the base

    free = copy.deepcopy(base)
    held = copy.deepcopy(base)
    finetune(free, tok, rows, [], cfg)
    finetune(held, tok, rows, [], cfg, anchor=anchor)
    kl_free, kl_held = anchor.mean_kl(free), anchor.mean_kl(held)
    assert math.isfinite(kl_free) and kl_free > 0.01, kl_free
    assert kl_held < 0.75 * kl_free, (kl_held, kl_free)
    changed = [
        not torch.equal(a, b)
        for a, b in zip(free.state_dict().values(), held.state_dict().values(), strict=True)
    ]
    assert any(changed)


def test_a_batch_without_anchored_rows_adds_nothing(tiny: LoadedBase) -> None:
    tok = tiny.tokenizer
    anchor = build_anchor(tiny.model, encode_texts(tok, ["real text here"]), 40, 1.0, 8)
    assert anchor.loss(tiny.model, encode_texts(tok, SYNTH), 10) is None
    term = anchor.loss(copy.deepcopy(tiny.model), encode_texts(tok, ["real text here"]), 10)
    assert term is not None and float(term) == pytest.approx(0.0, abs=1e-4)
