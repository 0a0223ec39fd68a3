import copy
import math
from typing import Any

import pytest
import torch

from core.modeling.loader import LoadedBase, load_base
from worker.rounds.evaluate import perplexity
from worker.rounds.metastep import MetaStepResult, interpolate_into, meta_step, state_copy

PROBE = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def tiny() -> LoadedBase:
    return load_base("tiny:llama")


def _tuned(tiny: LoadedBase) -> Any:
    """A copy of the base with every float weight moved: some a little, some across zero and
    by orders of magnitude, which is where a float32 delta would lose bits."""
    model = copy.deepcopy(tiny.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.01
            p.add_(noise)
            p.view(-1)[::7].mul_(-1000.0)
    return model


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _eps_of(model: Any, base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> float:
    """Recover ε from one weight: θ = base + ε (tuned − base)."""
    w = model.state_dict()[PROBE].double()
    b, t = base[PROBE].double(), tuned[PROBE].double()
    return float(((w - b) * (t - b)).sum() / ((t - b) ** 2).sum())


def test_state_copy_is_a_detached_cpu_clone_that_keeps_ties(tiny: LoadedBase) -> None:
    model = copy.deepcopy(tiny.model)
    state = state_copy(model)
    assert state.keys() == model.state_dict().keys()
    assert all(v.device.type == "cpu" and not v.requires_grad for v in state.values())
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
    before = state[PROBE].clone()
    with torch.no_grad():
        model.state_dict()[PROBE].add_(1.0)
    assert torch.equal(state[PROBE], before)


def test_eps_zero_and_one_reproduce_base_and_tuned_exactly(tiny: LoadedBase) -> None:
    base = state_copy(tiny.model)
    model = _tuned(tiny)
    tuned = state_copy(model)
    result = meta_step(
        model, base, [0.0, 1.0], lambda m: 0.0 if _eps_of(m, base, tuned) > 0.5 else 1.0
    )
    assert result.epsilon == 1.0
    assert _equal(state_copy(model), tuned)
    result = meta_step(model, base, [1.0, 0.0], lambda m: _eps_of(m, base, tuned))
    assert result.epsilon == 0.0
    assert _equal(state_copy(model), base)
    # Tied weights stay one tensor.
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_meta_step_picks_the_lowest_score_and_keeps_its_weights(tiny: LoadedBase) -> None:
    base = state_copy(tiny.model)
    model = _tuned(tiny)
    tuned = state_copy(model)
    grid = [0.25, 0.5, 1.0]
    result = meta_step(model, base, grid, lambda m: (_eps_of(m, base, tuned) - 0.5) ** 2)
    assert isinstance(result, MetaStepResult)
    assert result.epsilon == 0.5
    assert list(result.scores) == grid
    assert result.scores[0.5] == pytest.approx(0.0, abs=1e-12)
    assert result.scores[0.25] == pytest.approx(0.0625, rel=1e-6)
    # The model ends on ε = 0.5 even though ε = 1.0 was scored last.
    expected = copy.deepcopy(tiny.model)
    delta = {k: tuned[k].double() - base[k].double() for k in base}
    interpolate_into(expected, base, delta, 0.5)
    assert _equal(state_copy(model), state_copy(expected))
    assert _eps_of(model, base, tuned) == pytest.approx(0.5, abs=1e-6)


def test_meta_step_with_dev_perplexity_changes_the_model_output(tiny: LoadedBase) -> None:
    base = state_copy(tiny.model)
    model = _tuned(tiny)
    texts = ["The if statement is used for conditional execution."]
    result = meta_step(model, base, [0.0, 1.0], lambda m: perplexity(m, tiny.tokenizer, texts).ppl)
    # The noisy "tuned" model is far worse than the base, so ε = 0 wins.
    assert result.epsilon == 0.0 and result.scores[0.0] < result.scores[1.0]
    assert perplexity(model, tiny.tokenizer, texts).ppl == pytest.approx(result.scores[0.0])


def test_nan_scores_lose_ties_go_first_and_empty_grid_raises(tiny: LoadedBase) -> None:
    base = state_copy(tiny.model)
    model = _tuned(tiny)
    tuned = state_copy(model)
    result = meta_step(
        model, base, [0.5, 1.0], lambda m: math.nan if _eps_of(m, base, tuned) < 0.75 else 3.0
    )
    assert result.epsilon == 1.0 and math.isnan(result.scores[0.5])
    assert meta_step(model, base, [0.5, 1.0, 0.5], lambda m: 1.0).epsilon == 0.5
    with pytest.raises(ValueError):
        meta_step(model, base, [], lambda m: 0.0)
    with pytest.raises(KeyError):
        interpolate_into(model, {}, {}, 0.5)


def test_ranked_orders_epsilons_best_first_with_nan_last() -> None:
    from worker.rounds.metastep import MetaStepResult

    r = MetaStepResult(epsilon=0.5, scores={0.25: 19.0, 0.5: 18.0, 1.0: float("nan"), 2.0: 19.0})
    assert r.ranked() == [0.5, 0.25, 2.0, 1.0]
