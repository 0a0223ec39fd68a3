"""train_data modes: what each trains on, and its exact token budget."""

from __future__ import annotations

import random

import pytest

from core.modeling.loader import LoadedBase, load_base
from worker.rounds.data import load_corpus, passages
from worker.rounds.evaluate import encode_texts
from worker.rounds.traindata import build_train_data, real_ids


@pytest.fixture(scope="module")
def tiny() -> LoadedBase:
    return load_base("tiny:llama")


@pytest.fixture(scope="module")
def pool() -> list[str]:
    return passages(load_corpus(None).train)[:400]


def _selected(tiny: LoadedBase) -> tuple[list[list[int]], int]:
    tok = tiny.tokenizer
    prompts = ["The for statement is used", "A class definition defines"]
    out, prompt_tokens = [], 0
    for p in prompts:
        ids = [tok.bos_token_id, *tok(p, add_special_tokens=False)["input_ids"]]
        prompt_tokens += len(ids)
        out.append([*ids, 5, 6, 7, 8, 9, 10, 11, 12])  # a "generated" continuation
    return out, prompt_tokens


def test_modes_train_on_what_they_say_with_their_budgets(tiny: LoadedBase, pool: list[str]) -> None:
    sel, prompt_tokens = _selected(tiny)
    real_rows = {tuple(x) for x in encode_texts(tiny.tokenizer, pool)}
    built = {
        m: build_train_data(m, pool, tiny.tokenizer, sel, prompt_tokens, 0.5, 48, random.Random(3))
        for m in ("mixed", "real_only", "real_only_matched")
    }
    mixed, real, matched = built["mixed"], built["real_only"], built["real_only_matched"]
    selected_tokens = sum(len(x) for x in sel)
    assert mixed.rows[: len(sel)] == sel and mixed.real == mixed.rows[len(sel) :]
    assert mixed.synthetic_tokens == selected_tokens and mixed.real_tokens >= selected_tokens
    for d in (real, matched):
        assert d.synthetic_tokens == 0 and d.rows == d.real
        assert not any(row in sel for row in d.rows)  # no generated row
        # every row is the start of a real train passage (cut to max_length / the budget)
        assert all(any(r[: len(row)] == tuple(row) for r in real_rows) for row in d.rows)
        # the replay draw comes first, as mixed drew it
        assert d.rows[: len(mixed.real) - 1] == mixed.real[:-1]
        assert d.real_tokens == sum(len(x) for x in d.rows)
        assert d.replay_tokens == mixed.real_tokens
    assert real.real_tokens == mixed.real_tokens + prompt_tokens
    assert matched.real_tokens == mixed.real_tokens + mixed.synthetic_tokens


def test_real_ids_is_exact_and_reuses_a_small_pool(tiny: LoadedBase, pool: list[str]) -> None:
    few = pool[:3]
    for target in (2, 3, 17, 500):
        rows = real_ids(few, tiny.tokenizer, target, 32, random.Random(0))
        assert sum(len(r) for r in rows) == target, target
        assert all(2 <= len(r) <= 32 for r in rows)
    assert real_ids([], tiny.tokenizer, 10, 32, random.Random(0)) == []
