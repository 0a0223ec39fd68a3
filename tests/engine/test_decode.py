"""Batched decoding: rows that join a running batch, or leave it, decode as if alone."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from core.modeling.decode import Row, decode_batch
from core.modeling.loader import tiny_model
from core.modeling.params import SamplingParams


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request: pytest.FixtureRequest) -> Any:
    base = tiny_model(request.param, seed=3)
    base.model.eval()
    return base


def alone(tiny: Any, prompt: list[int], params: SamplingParams) -> list[int]:
    row = Row(prompt_ids=prompt, params=params)
    decode_batch(tiny.model, tiny.tokenizer, [row])
    return row.generated


def prompts(tiny: Any) -> list[list[int]]:
    texts = ["Hello", "The Python language is used for many", "A", "def f(x): return x + 1"]
    return [tiny.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_rows_joining_mid_batch_match_solo_decoding(tiny: Any) -> None:
    ps = prompts(tiny)
    lengths = [12, 5, 9, 7]
    solo = [
        alone(tiny, p, SamplingParams(max_new_tokens=n)) for p, n in zip(ps, lengths, strict=True)
    ]
    sampled_solo = alone(tiny, ps[1], SamplingParams(8, do_sample=True, top_p=0.9, seed=5))
    waiting = [
        Row(prompt_ids=p, params=SamplingParams(max_new_tokens=n))
        for p, n in zip(ps[1:], lengths[1:], strict=True)
    ]
    waiting.append(
        Row(prompt_ids=ps[1], params=SamplingParams(8, do_sample=True, top_p=0.9, seed=5))
    )
    first = Row(prompt_ids=ps[0], params=SamplingParams(max_new_tokens=lengths[0]))
    finished: list[Row] = []
    steps = 0

    def admit(room: int) -> list[Row]:
        nonlocal steps
        steps += 1
        # One newcomer every other step (always one when the batch ran empty).
        if not waiting or room == 0 or (steps % 2 and room < 3):
            return []
        return [waiting.pop(0)]

    decode_batch(
        tiny.model, tiny.tokenizer, [first], admit=admit, on_finish=finished.append, max_rows=3
    )
    assert len(finished) == 5 and not waiting
    by_prompt = {id(r): r for r in finished}
    assert by_prompt[id(first)].generated == solo[0]
    got = [r.generated for r in finished if r is not first]
    for expected in solo[1:]:
        assert expected in got
    assert sampled_solo in got
    # Rows are reported the moment they finish: the 5-token row before the 12-token one.
    order = [len(r.generated) for r in finished]
    assert order.index(5) < order.index(12)


def test_eos_and_length_leave_the_batch(tiny: Any) -> None:
    ps = prompts(tiny)
    rows = [
        Row(prompt_ids=p, params=SamplingParams(max_new_tokens=n))
        for p, n in zip(ps, (1, 3, 6, 2), strict=True)
    ]
    done: list[Row] = []
    decode_batch(tiny.model, tiny.tokenizer, rows, on_finish=done.append)
    assert [len(r.generated) for r in done] == [1, 2, 3, 6]
    assert all(r.finish_reason == "length" for r in rows)
    with torch.no_grad():
        assert rows[2].generated == alone(tiny, ps[2], SamplingParams(6))
