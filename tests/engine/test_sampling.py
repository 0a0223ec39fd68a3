"""The fast top-k/top-p path samples from exactly the distribution of the full path."""

from __future__ import annotations

import pytest
import torch

from core.modeling.params import SamplingParams
from core.modeling.sampling import CANDIDATES, choose_next, warp


def draws(logits: torch.Tensor, p: SamplingParams, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    batch = logits.expand(n, -1).contiguous()
    chosen, _ = choose_next(batch, [p] * n, [g] * n)
    return chosen


def test_fast_nucleus_matches_exact_distribution() -> None:
    torch.manual_seed(1)
    logits = torch.randn(1, 8000) * 4  # peaked: the nucleus fits in the candidates
    p = SamplingParams(max_new_tokens=1, do_sample=True, temperature=0.7, top_p=0.9)
    exact = warp(logits[0], p).softmax(-1)
    support = set(torch.nonzero(exact).flatten().tolist())
    assert len(support) < CANDIDATES
    got = draws(logits, p, 4000)
    assert set(got.tolist()) <= support
    freq = torch.bincount(got, minlength=8000).float() / len(got)
    top = exact.topk(5).indices
    assert torch.allclose(freq[top], exact[top], atol=0.03)


def test_top_k_and_flat_distributions_fall_back_exactly() -> None:
    flat = torch.zeros(1, 5000)  # the 0.9 nucleus needs 4500 tokens: full path
    p = SamplingParams(max_new_tokens=1, do_sample=True, top_p=0.9)
    got = draws(flat, p, 500)
    assert set(got.tolist()) <= set(torch.nonzero(warp(flat[0], p).softmax(-1)).flatten().tolist())
    assert len(set(got.tolist())) > 300  # really spread over the nucleus
    torch.manual_seed(2)
    logits = torch.randn(1, 5000)
    pk = SamplingParams(max_new_tokens=1, do_sample=True, top_k=5)
    assert set(draws(logits, pk, 300).tolist()) == set(logits[0].topk(5).indices.tolist())


def test_greedy_rows_are_argmax_beside_sampled_rows() -> None:
    torch.manual_seed(3)
    logits = torch.randn(3, 1000)
    params = [SamplingParams(1), SamplingParams(1, do_sample=True, top_p=0.5), SamplingParams(1)]
    gens = [None, torch.Generator().manual_seed(1), None]
    chosen, logprobs = choose_next(logits, params, gens)
    assert chosen[0] == logits[0].argmax() and chosen[2] == logits[2].argmax()
    assert torch.allclose(logprobs, logits.log_softmax(-1).gather(1, chosen[:, None])[:, 0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_logits_sample_with_cpu_generators_like_the_cpu() -> None:
    """Rows keep CPU generators; CUDA logits give the same draws (fast and full paths)."""
    torch.manual_seed(4)
    peaked = torch.randn(2, 8000) * 4  # nucleus inside the candidates: fast path
    flat = torch.randn(2, 8000) * 0.1  # nucleus beyond them: full path
    logits = torch.cat([peaked, flat])
    params = [
        SamplingParams(1, do_sample=True, temperature=0.8, top_p=0.95),
        SamplingParams(1),
        SamplingParams(1, do_sample=True, temperature=0.8, top_p=0.95),
        SamplingParams(1, do_sample=True, top_k=7),
    ]

    def gens() -> list[torch.Generator | None]:
        return [
            None if not p.do_sample else torch.Generator().manual_seed(i)
            for i, p in enumerate(params)
        ]

    cpu, _ = choose_next(logits, params, gens())
    gpu, lp = choose_next(logits.cuda(), params, gens())
    assert gpu.device.type == "cuda" and lp.device.type == "cuda"
    assert gpu.cpu().tolist() == cpu.tolist()
