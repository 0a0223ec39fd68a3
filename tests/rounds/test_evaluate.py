import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from core.modeling.loader import LoadedBase, load_base
from worker.rounds.evaluate import (
    IGNORE_INDEX,
    Perplexity,
    collate,
    encode_texts,
    length_batches,
    per_sample_loss,
    perplexity,
    split_windows,
)

TEXTS = [
    "The if statement is used for conditional execution.",
    "Short one.",
    "A for loop iterates over the items of any sequence, such as a list or a string, "
    "in the order that they appear in the sequence.",
    "x",
    "Exceptions are raised with the raise statement and handled by try.",
    "def f(a, b=1):\n    return a + b\n",
]


@pytest.fixture(scope="module")
def tiny() -> LoadedBase:
    base = load_base("tiny:llama")
    base.model.eval()
    return base


def _by_hand(model: Any, ids_list: Sequence[list[int]]) -> tuple[float, int]:
    """Unbatched, unpadded: sum of -log p(target) over every position after the first."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in ids_list:
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for i in range(len(ids) - 1):
                total -= float(logp[i, ids[i + 1]])
                count += 1
    return total, count


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_perplexity_matches_hand_computation(arch: str) -> None:
    base = load_base(f"tiny:{arch}")
    tok, model = base.tokenizer, base.model.eval()
    texts = TEXTS[:2]  # different lengths, so the batch is padded
    ids = [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]] for t in texts]
    assert len(ids[0]) != len(ids[1])
    nll, count = _by_hand(model, ids)
    got = perplexity(model, tok, texts, batch_size=2)
    assert got.tokens == count == sum(len(x) - 1 for x in ids)
    assert got.nll == pytest.approx(nll, rel=1e-5)
    assert got.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_batching_and_padding_do_not_change_the_result(tiny: LoadedBase) -> None:
    one = perplexity(tiny.model, tiny.tokenizer, TEXTS, batch_size=1)
    four = perplexity(tiny.model, tiny.tokenizer, TEXTS, batch_size=4)
    assert one.tokens == four.tokens
    assert four.nll == pytest.approx(one.nll, rel=1e-4)
    assert four.ppl == pytest.approx(one.ppl, rel=1e-4)


def test_token_weighted_not_mean_of_per_text_perplexities(tiny: LoadedBase) -> None:
    got = perplexity(tiny.model, tiny.tokenizer, TEXTS)
    parts = [perplexity(tiny.model, tiny.tokenizer, [t]) for t in TEXTS]
    assert got.tokens == sum(p.tokens for p in parts)
    assert got.nll == pytest.approx(sum(p.nll for p in parts), rel=1e-5)
    assert got.ppl == pytest.approx(math.exp(got.nll / got.tokens), rel=1e-9)


def test_token_ids_are_scored_like_their_texts(tiny: LoadedBase) -> None:
    ids = encode_texts(tiny.tokenizer, TEXTS)
    assert all(row[0] == tiny.tokenizer.bos_token_id for row in ids)
    assert perplexity(tiny.model, tiny.tokenizer, ids) == perplexity(
        tiny.model, tiny.tokenizer, TEXTS
    )
    # Id lists are used verbatim: no BOS is added a second time.
    assert encode_texts(tiny.tokenizer, ids) == ids
    with pytest.raises(TypeError):
        encode_texts(tiny.tokenizer, ["text", [1, 2]])  # type: ignore[arg-type]


def test_long_texts_are_windowed_not_truncated(tiny: LoadedBase) -> None:
    long_text = " ".join(TEXTS * 4)
    n = len(encode_texts(tiny.tokenizer, [long_text])[0])
    assert n > 40
    windowed = perplexity(tiny.model, tiny.tokenizer, [long_text], max_length=16)
    whole = perplexity(tiny.model, tiny.tokenizer, [long_text], max_length=512)
    assert windowed.tokens == whole.tokens == n - 1
    # Context is reset per window, so the numbers differ, but both are proper averages.
    assert windowed.ppl != whole.ppl


def test_split_windows_predict_every_id_once() -> None:
    seq = list(range(10))
    windows = split_windows([seq, [7]], max_length=4)
    assert windows == [(0, [0, 1, 2, 3]), (0, [3, 4, 5, 6]), (0, [6, 7, 8, 9]), (1, [7])]
    assert sum(len(w) - 1 for i, w in windows if i == 0) == len(seq) - 1
    assert split_windows([list(range(4))], 4) == [(0, [0, 1, 2, 3])]
    with pytest.raises(ValueError):
        split_windows([seq], 1)


def test_length_batches_group_similar_lengths() -> None:
    assert length_batches([5, 1, 3, 2, 4], 2) == [[1, 3], [2, 4], [0]]
    with pytest.raises(ValueError):
        length_batches([1], 0)


def test_collate_labels_come_from_the_mask_not_the_pad_id() -> None:
    eos = 2
    ids, mask, labels = collate([[1, 5, eos], [1]], pad_id=eos, device=torch.device("cpu"))
    assert ids.tolist() == [[1, 5, eos], [1, eos, eos]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    # The real EOS in row 0 is a target; the pads in row 1 are not.
    assert labels.tolist() == [[1, 5, eos], [1, IGNORE_INDEX, IGNORE_INDEX]]


def test_per_sample_loss_is_in_input_order(tiny: LoadedBase) -> None:
    losses = per_sample_loss(tiny.model, tiny.tokenizer, TEXTS, batch_size=3)
    for text, loss in zip(TEXTS, losses, strict=True):
        single = perplexity(tiny.model, tiny.tokenizer, [text])
        assert loss == pytest.approx(single.nll / single.tokens, rel=1e-4)
    reversed_losses = per_sample_loss(tiny.model, tiny.tokenizer, TEXTS[::-1], batch_size=3)
    assert reversed_losses == pytest.approx(losses[::-1], rel=1e-4)
    empty = per_sample_loss(tiny.model, tiny.tokenizer, ["", "x"])
    assert math.isnan(empty[0]) and math.isfinite(empty[1])
    ids = encode_texts(tiny.tokenizer, ["x", "a longer text"])
    mixed = per_sample_loss(tiny.model, tiny.tokenizer, [[], ids[0], ids[1]])
    assert math.isnan(mixed[0]) and all(math.isfinite(v) for v in mixed[1:])


def test_empty_input_raises_and_mode_is_restored(tiny: LoadedBase) -> None:
    with pytest.raises(ValueError):
        perplexity(tiny.model, tiny.tokenizer, [])
    with pytest.raises(ValueError):
        perplexity(tiny.model, tiny.tokenizer, [""])
    tiny.model.train()
    try:
        result = perplexity(tiny.model, tiny.tokenizer, TEXTS[:1])
        assert tiny.model.training
    finally:
        tiny.model.eval()
    assert isinstance(result, Perplexity) and result.ppl > 1.0
