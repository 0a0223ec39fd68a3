"""Batched sampling (tensor operations over the rows, one uniform draw per row from its own
generator): a row draws the same alone as beside rows with other parameters, and plain
temperature sampling follows softmax(logits / T)."""

from __future__ import annotations

import torch

from core.modeling.params import SamplingParams
from core.modeling.sampling import choose_next

PARAMS = [
    SamplingParams(1, do_sample=True, temperature=0.7, top_p=0.9),
    SamplingParams(1),  # greedy
    SamplingParams(1, do_sample=True, top_k=20),
    SamplingParams(1, do_sample=True, temperature=1.3),  # the whole vocabulary
    SamplingParams(1, do_sample=True, temperature=0.5, top_k=50, top_p=0.8),
    SamplingParams(1, do_sample=True, top_p=0.95, typical_p=0.9),  # the exact path
]


def _gens(seed: int) -> list[torch.Generator | None]:
    return [
        torch.Generator().manual_seed(seed + i) if p.do_sample else None
        for i, p in enumerate(PARAMS)
    ]


def test_rows_draw_the_same_alone_and_in_a_batch() -> None:
    torch.manual_seed(0)
    batch_gens, solo_gens = _gens(10), _gens(10)
    for step in range(20):
        logits = torch.randn(len(PARAMS), 3000) * (1 + step % 4)
        together, _ = choose_next(logits, PARAMS, batch_gens)
        for i, p in enumerate(PARAMS):
            alone, _ = choose_next(logits[i : i + 1], [p], [solo_gens[i]])
            assert int(alone[0]) == int(together[i]), (step, i)
        assert int(together[1]) == int(logits[1].argmax())


def test_plain_temperature_sampling_follows_the_distribution() -> None:
    torch.manual_seed(1)
    logits = torch.randn(1, 50) * 2
    p = SamplingParams(1, do_sample=True, temperature=1.5)
    g = torch.Generator().manual_seed(0)
    n = 6000
    chosen, _ = choose_next(logits.expand(n, -1).contiguous(), [p] * n, [g] * n)
    freq = torch.bincount(chosen, minlength=50).float() / n
    assert torch.allclose(freq, (logits[0] / 1.5).softmax(-1), atol=0.02)


def test_top_k_keeps_exactly_k_tokens() -> None:
    torch.manual_seed(2)
    logits = torch.randn(1, 2000)
    p = SamplingParams(1, do_sample=True, top_k=3, temperature=5.0)  # nearly flat over 3
    g = torch.Generator().manual_seed(0)
    chosen, _ = choose_next(logits.expand(600, -1).contiguous(), [p] * 600, [g] * 600)
    assert set(chosen.tolist()) == set(logits[0].topk(3).indices.tolist())


def test_top_k_then_top_p_keeps_what_warp_keeps() -> None:
    """Top-p applies to the renormalized top-k distribution (as transformers and `warp`),
    also where the full distribution is too flat for its nucleus to fit the candidates."""
    from core.modeling.sampling import warp

    torch.manual_seed(5)
    for logits in (torch.randn(1, 4000) * 3, torch.randn(1, 4000) * 0.1):
        p = SamplingParams(1, do_sample=True, temperature=0.9, top_k=40, top_p=0.6)
        support = set(torch.nonzero(warp(logits[0], p).softmax(-1)).flatten().tolist())
        g = torch.Generator().manual_seed(0)
        chosen, _ = choose_next(logits.expand(800, -1).contiguous(), [p] * 800, [g] * 800)
        assert set(chosen.tolist()) == support
