"""LoRA update: target checks, the adapter merged into plain weights, the adapter delta's
interpolation (worker.rounds.lora with the meta-step), the round parameters' bounds."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from core.modeling.loader import LoadedBase, load_base
from core.round_params import RoundParams
from worker.rounds import lora
from worker.rounds.metastep import PartialState, interpolate_into, meta_step, state_copy
from worker.rounds.update import TrainConfig, finetune

TEXTS = [
    "The quick brown fox jumps over the lazy dog, again and again, all day long.",
    "A function returns a value; a generator yields several, one at a time.",
] * 4


@pytest.fixture(scope="module")
def tiny() -> LoadedBase:
    return load_base("tiny:llama")


def _params(**kw: Any) -> RoundParams:
    return RoundParams(update_method="lora", **kw)


@pytest.fixture(scope="module")
def trained(tiny: LoadedBase) -> tuple[Any, PartialState, dict[str, torch.Tensor]]:
    """A LoRA-trained, merged copy of the tiny model, the base its wrap returned, and the
    parent's full state."""
    parent = state_copy(tiny.model)
    wrapped, base = lora.wrap(
        copy.deepcopy(tiny.model), _params(lora_rank=4, lora_target_modules=["q_proj", "up_proj"])
    )
    finetune(
        wrapped, tiny.tokenizer, TEXTS, TEXTS[:2], TrainConfig(learning_rate=1e-2, batch_size=4)
    )
    return lora.merge(wrapped), base, parent


def test_only_the_adapter_trains(tiny: LoadedBase) -> None:
    wrapped, base = lora.wrap(copy.deepcopy(tiny.model), _params(lora_rank=2))
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    # peft's default for Llama: q_proj and v_proj in every layer; the base holds exactly those.
    layers = tiny.model.config.num_hidden_layers
    assert isinstance(base, PartialState) and len(base) == 2 * layers
    assert all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in base)


def test_merged_model_is_plain_and_changes_only_the_adapted_weights(
    tiny: LoadedBase, trained: tuple[Any, PartialState, dict[str, torch.Tensor]]
) -> None:
    merged, base, parent = trained
    assert type(merged) is type(tiny.model)
    assert not hasattr(merged, "peft_config")
    assert not any("lora" in n or "base_layer" in n for n, _ in merged.named_modules())
    state = merged.state_dict()
    assert state.keys() == parent.keys()
    changed = {k for k in state if not torch.equal(state[k], parent[k])}
    assert changed == set(base)  # every adapted weight moved, nothing else did
    assert all(k.endswith(("q_proj.weight", "up_proj.weight")) for k in changed)


def test_interpolation_spans_parent_to_merged_adapter(
    trained: tuple[Any, PartialState, dict[str, torch.Tensor]],
) -> None:
    merged, base, parent = trained
    tuned = state_copy(merged)
    model = copy.deepcopy(merged)
    ms = meta_step(model, base, [0.5, 1.0], lambda m: 1.0, keep_delta=True)
    assert ms.delta is not None and set(ms.delta) == set(base)  # the adapter delta only
    assert all(d.dtype == torch.float64 for d in ms.delta.values())

    interpolate_into(model, base, ms.delta, 0.0)
    assert all(torch.equal(v, parent[k]) for k, v in model.state_dict().items())
    interpolate_into(model, base, ms.delta, 1.0)
    assert all(torch.equal(v, tuned[k]) for k, v in model.state_dict().items())
    interpolate_into(model, base, ms.delta, 0.5)
    key = next(iter(base))
    want = (parent[key].double() + 0.5 * (tuned[key].double() - parent[key].double())).float()
    assert torch.equal(model.state_dict()[key], want)


def test_a_full_base_state_must_still_cover_every_weight(
    trained: tuple[Any, PartialState, dict[str, torch.Tensor]],
) -> None:
    # The skip is for a PartialState only: a plain dict missing weights is a bug, as before.
    merged, base, _ = trained
    with pytest.raises(KeyError, match="base state lacks"):
        meta_step(copy.deepcopy(merged), dict(base), [1.0], lambda m: 1.0)


def test_custom_targets_resolve_by_suffix(tiny: LoadedBase) -> None:
    names = lora.resolve_targets(tiny.model, _params(lora_target_modules=["mlp.down_proj"]))
    assert len(names) == tiny.model.config.num_hidden_layers
    assert all(n.endswith(".mlp.down_proj") for n in names)


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (["nope"], "'nope' matches no module of this model"),
        (["lm_head"], r"'lm_head' names 1 module\(s\) that LoRA cannot adapt"),
        (["self_attn"], "cannot adapt here"),
        (["q_proj", "embed_tokens"], "'embed_tokens'"),
    ],
)
def test_targets_the_model_lacks_fail_clearly(
    tiny: LoadedBase, targets: list[str], message: str
) -> None:
    with pytest.raises(lora.LoraTargetError, match=message) as err:
        lora.resolve_targets(tiny.model, _params(lora_target_modules=targets))
    assert "q_proj, k_proj, v_proj" in str(err.value)  # what would fit


@pytest.mark.parametrize(
    "bad",
    [
        {"update_method": "adapter"},
        {"update_method": "lora", "lora_rank": 0},
        {"update_method": "lora", "lora_rank": 1024},
        {"update_method": "lora", "lora_alpha": 0},
        {"update_method": "lora", "lora_dropout": 1.0},
        {"update_method": "lora", "lora_target_modules": []},
        {"update_method": "lora", "lora_target_modules": [""]},
        {"update_method": "lora", "lora_target_modules": ["q proj"]},
        {"update_method": "lora", "lora_target_modules": ["q_proj;rm"]},
        {"update_method": "lora", "lora_target_modules": [".q_proj"]},
        {"update_method": "lora", "lora_target_modules": ["x" * 200]},
        {"update_method": "lora", "lora_target_modules": ["q_proj"] * 65},
        {"update_method": "lora", "lora_target_modules": "q_proj"},
        {"lora_target_modules": ["q_proj"]},  # LoRA targets on a full round
    ],
)
def test_malformed_lora_params_are_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        RoundParams(**bad)


def test_stored_params_round_trip() -> None:
    p = _params(lora_rank=16, lora_alpha=32, lora_target_modules=["q_proj", "mlp.up_proj"])
    assert RoundParams.model_validate(p.model_dump()) == p
    assert RoundParams().update_method == "full"
