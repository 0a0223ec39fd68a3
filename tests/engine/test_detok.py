"""Incremental detokenization and stop sequences: constant work per token, the same text
and the same stopping token as decoding the whole output (multi-byte characters split over
tokens, stop sequences split over tokens)."""

from __future__ import annotations

from typing import Any

import pytest

from core.modeling.decode import Row, decode_batch
from core.modeling.detok import REPLACEMENT, Detokenizer, StopFinder
from core.modeling.loader import smollm2_tokenizer, tiny_model
from core.modeling.params import SamplingParams

TEXTS = [
    "Grüße 日本語 🙂 naïve",  # characters spread over two and three byte-level tokens
    " hello world\n\n  def f(x):\treturn x",
    "🙂🙂 a🙂b 日本",
]


@pytest.fixture(scope="module")
def tok() -> Any:
    return smollm2_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_the_full_decode(tok: Any, text: str) -> None:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = Detokenizer(tok)
    pieces = [d.push(t) for t in ids]
    assert "".join(pieces) + d.flush() == tok.decode(ids) == text
    assert not any(REPLACEMENT in p for p in pieces)  # no half character is ever released
    # "日" takes three byte tokens: the first two release nothing, the third all of it.
    if "日本語" in text:
        assert "" in pieces and any("日" in p for p in pieces)


def test_held_back_bytes_flush_as_a_full_decode_would(tok: Any) -> None:
    ids = tok("x 日", add_special_tokens=False)["input_ids"]
    d = Detokenizer(tok)
    pieces = [d.push(t) for t in ids[:-1]]  # stop inside the three-byte character
    tail = d.flush()
    assert "".join(pieces) + tail == tok.decode(ids[:-1])
    assert REPLACEMENT in tail


def test_special_tokens_release_nothing(tok: Any) -> None:
    d = Detokenizer(tok)
    hello = tok(" hello", add_special_tokens=False)["input_ids"]
    assert d.push(tok.eos_token_id) == ""
    assert "".join(d.push(t) for t in hello) == " hello"


def test_stop_split_over_pieces_is_found_where_it_completes() -> None:
    f = StopFinder(["日本語", "END"])
    assert [f.feed(p) for p in ["a 日", "", "本", "語 b"]] == [False, False, False, True]
    g = StopFinder(["END"])
    assert [g.feed(p) for p in ["xE", "N", "D"]] == [False, False, True]
    assert not StopFinder([]).feed("anything")


@pytest.fixture(scope="module")
def tiny() -> Any:
    base = tiny_model("llama", seed=3)
    base.model.eval()
    return base


def _full_decode_stop(tok: Any, generated: list[int], stop: str) -> int:
    """The number of tokens after which the old, whole-output decode first contains `stop`."""
    for n in range(1, len(generated) + 1):
        if stop in tok.decode(generated[:n], skip_special_tokens=True):
            return n
    return 0


def test_decode_batch_stops_on_a_sequence_spanning_tokens(tiny: Any) -> None:
    tok = tiny.tokenizer
    prompt = tok("The Python language is", add_special_tokens=False)["input_ids"]
    free = Row(prompt_ids=prompt, params=SamplingParams(max_new_tokens=24))
    decode_batch(tiny.model, tok, [free])
    texts = [tok.decode([t], skip_special_tokens=True) for t in free.generated]
    # A stop sequence made of the end of one token's text and the start of the next.
    k = next(
        i
        for i in range(3, len(texts) - 1)
        if len(texts[i].strip()) >= 2 and len(texts[i + 1].strip()) >= 1
    )
    stop = texts[k][-2:] + texts[k + 1][:1]
    expected = _full_decode_stop(tok, free.generated, stop)
    assert 0 < expected <= k + 2
    rows = [
        Row(prompt_ids=prompt, params=SamplingParams(max_new_tokens=24, stop=(stop,))),
        Row(prompt_ids=prompt, params=SamplingParams(max_new_tokens=24)),  # a neighbour
    ]
    decode_batch(tiny.model, tok, rows)
    stopped = rows[0]
    assert stopped.finish_reason == "stop_sequence"
    assert stopped.generated == free.generated[:expected]
    assert stopped.text == tok.decode(stopped.generated, skip_special_tokens=True)
    assert stop in stopped.text
    assert rows[1].generated == free.generated and rows[1].finish_reason == "length"


def test_token_details_add_up_to_the_text_over_multibyte_characters(tok: Any) -> None:
    from core.modeling.details import token_details

    text = "Grüße 日本語 🙂"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    row = Row(prompt_ids=[1], params=SamplingParams(len(ids)))
    row.generated, row.logprobs = ids, [0.0] * len(ids)
    row.eos_token, row.eos_logprob = tok.eos_token_id, 0.0
    details = token_details(row, tok)
    assert [d.id for d in details] == [*ids, tok.eos_token_id]
    assert "".join(d.text for d in details if not d.special) == text
    assert not any(REPLACEMENT in d.text for d in details)
    assert details[-1].special and details[-1].text == tok.decode([tok.eos_token_id])
