"""The packed step (running rows and newcomers' prompts in one forward) computes what the
model's own forward computes: the same next-token logits and the same keys and values."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from core.modeling.decode import Row, _prefill, decode_batch, forward_kwargs
from core.modeling.loader import tiny_model
from core.modeling.packed import packed_step, supports_packed
from core.modeling.params import SamplingParams


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request: pytest.FixtureRequest) -> Any:
    base = tiny_model(request.param, seed=7)
    base.model.eval()
    return base


def ids(tiny: Any, text: str) -> list[int]:
    out: list[int] = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    return out


def test_which_models_pack() -> None:
    assert supports_packed(tiny_model("llama").model)
    assert supports_packed(tiny_model("qwen2").model)
    assert not supports_packed(tiny_model("gpt2").model)


@torch.inference_mode()
def test_packed_step_matches_the_models_forward(tiny: Any) -> None:
    model = tiny.model
    running = [ids(tiny, "The Python language is used for"), ids(tiny, "Hello")]
    newcomers = [ids(tiny, "def f(x): return x"), ids(tiny, "A"), ids(tiny, "import os, sys")]
    rows = [Row(prompt_ids=p, params=SamplingParams(4)) for p in running]
    cache, mask, logits = _prefill(model, rows, 0, torch.device("cpu"))
    chosen = logits.argmax(-1)
    step_mask = torch.cat([mask, mask.new_ones((2, 1))], dim=1)
    positions = step_mask.sum(-1) - 1

    # What the model computes: the running rows' step on a copy of their cache, then each
    # newcomer's prompt alone.
    ref_cache = copy.deepcopy(cache)
    ref = model(
        input_ids=chosen[:, None],
        attention_mask=step_mask,
        position_ids=positions[:, None],
        use_cache=True,
        **{forward_kwargs(model)[0]: ref_cache},
    ).logits[:, -1]
    alone = [model(input_ids=torch.tensor([p]), use_cache=True) for p in newcomers]

    got, joined = packed_step(model, cache, step_mask, chosen, positions, newcomers)

    assert got.shape == (5, model.config.vocab_size)
    torch.testing.assert_close(got[:2], ref, atol=1e-4, rtol=1e-4)
    for j, out in enumerate(alone):
        torch.testing.assert_close(got[2 + j], out.logits[0, -1], atol=1e-4, rtol=1e-4)
    for layer, ref_layer in zip(cache.layers, ref_cache.layers, strict=True):
        assert isinstance(layer, DynamicLayer) and isinstance(ref_layer, DynamicLayer)
        torch.testing.assert_close(layer.keys, ref_layer.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.values, ref_layer.values, atol=1e-5, rtol=1e-5)
    width = max(len(p) for p in newcomers)
    assert joined.mask.tolist() == [[0] * (width - len(p)) + [1] * len(p) for p in newcomers]
    for i, (keys, values) in enumerate(joined.kv):
        for j, (p, out) in enumerate(zip(newcomers, alone, strict=True)):
            layer = out.past_key_values.layers[i]
            torch.testing.assert_close(
                keys[j, :, width - len(p) :], layer.keys[0], atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(
                values[j, :, width - len(p) :], layer.values[0], atol=1e-5, rtol=1e-5
            )
            assert not keys[j, :, : width - len(p)].any()  # left padding is zeros


def test_packed_and_unpacked_joins_generate_the_same(tiny: Any) -> None:
    """A schedule in which newcomers join almost every step, greedy and sampled rows mixed."""
    texts = ["Hello", "The Python language", "A", "def f(x):", "import os", "class C:", "x = 1"]

    def run(pack: bool) -> list[list[int]]:
        rows = [
            Row(
                prompt_ids=ids(tiny, t),
                params=SamplingParams(6 + i, do_sample=bool(i % 2), top_p=0.9, seed=i),
            )
            for i, t in enumerate(texts)
        ]
        waiting = rows[1:]

        def admit(room: int) -> list[Row]:
            take = waiting[: min(room, 2)]
            del waiting[: len(take)]
            return take

        decode_batch(tiny.model, tiny.tokenizer, rows[:1], admit=admit, max_rows=4, pack_joins=pack)
        assert all(r.finish_reason == "length" for r in rows)
        return [r.generated for r in rows]

    assert run(True) == run(False)
