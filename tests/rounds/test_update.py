import copy
import math
import os
from typing import Any

import pytest
import torch

from core.modeling.device import cpu_has_fast_bf16
from core.modeling.loader import LoadedBase, load_base
from worker.rounds import update
from worker.rounds.evaluate import encode_texts, perplexity
from worker.rounds.metastep import state_copy
from worker.rounds.train_modes import autocast_dtype
from worker.rounds.update import EpochStats, TrainConfig, finetune

REPEATED = [
    "The cat sat on the mat. The cat sat on the mat.",
    "Lists are mutable sequences, tuples are immutable ones.",
]
OTHER = [
    "Exceptions are raised with the raise statement and handled by try.",
    "A for loop iterates over the items of any sequence.",
]


@pytest.fixture(scope="module")
def tiny() -> LoadedBase:
    return load_base("tiny:llama")


def _fresh(tiny: LoadedBase) -> Any:
    return copy.deepcopy(tiny.model)


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_lowers_loss_on_its_training_texts(tiny: LoadedBase) -> None:
    model = _fresh(tiny)
    before = perplexity(model, tiny.tokenizer, REPEATED)
    seen: list[EpochStats] = []
    # One step per epoch: ten steps are enough for a tiny model to start memorising.
    cfg = TrainConfig(learning_rate=3e-3, epochs=10, batch_size=2, warmup_ratio=0.1)
    result = finetune(model, tiny.tokenizer, REPEATED, [], cfg, on_epoch=seen.append)
    after = perplexity(model, tiny.tokenizer, REPEATED)
    assert after.ppl < before.ppl / 3
    assert seen == result.epochs and len(result.epochs) == 10
    assert all(e.valid_loss is None for e in result.epochs)
    assert result.best_epoch == 10 and not result.stopped_early
    # Trained tokens are label tokens: n - 1 predictions per sequence per epoch.
    assert result.tokens_trained == 10 * before.tokens
    assert result.tokens_per_s > 0 and result.seconds > 0
    assert result.epochs[-1].train_loss < result.epochs[0].train_loss
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_early_stop_restores_the_best_epoch(tiny: LoadedBase) -> None:
    model = _fresh(tiny)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch(stats: EpochStats) -> None:
        snapshots[stats.epoch] = state_copy(model)

    # A high learning rate on repetitive text overfits fast: loss on unrelated text first
    # falls (common tokens) and then rises, which triggers the early stop.
    cfg = TrainConfig(learning_rate=3e-2, epochs=8, batch_size=2, warmup_ratio=0.0, patience=1)
    result = finetune(model, tiny.tokenizer, REPEATED, OTHER, cfg, on_epoch=on_epoch)
    losses = [e.valid_loss for e in result.epochs]
    assert all(v is not None for v in losses)
    assert result.stopped_early and len(result.epochs) < 8
    assert result.best_epoch < result.epochs[-1].epoch
    assert losses[result.best_epoch - 1] == min(losses)  # type: ignore[type-var]
    assert _same_state(state_copy(model), snapshots[result.best_epoch])
    assert not _same_state(state_copy(model), snapshots[result.epochs[-1].epoch])
    # The restored model scores the best epoch's valid loss.
    restored = perplexity(model, tiny.tokenizer, OTHER)
    assert restored.nll / restored.tokens == pytest.approx(min(losses), rel=1e-5)  # type: ignore[type-var]


def test_bf16_autocast_runs_on_cpu_with_float32_weights(tiny: LoadedBase) -> None:
    model = _fresh(tiny)
    cfg = TrainConfig(learning_rate=1e-3, epochs=2, batch_size=2, autocast="bf16")
    result = finetune(model, tiny.tokenizer, REPEATED, OTHER, cfg)
    assert len(result.epochs) >= 1
    assert all(math.isfinite(e.train_loss) for e in result.epochs)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_autocast_choice() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype("off", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("auto", cpu) is (torch.bfloat16 if cpu_has_fast_bf16() else None)


def test_training_is_deterministic_for_a_seed_and_accepts_token_ids(tiny: LoadedBase) -> None:
    cfg = TrainConfig(learning_rate=1e-3, epochs=1, batch_size=2, seed=7)
    a, b = _fresh(tiny), _fresh(tiny)
    finetune(a, tiny.tokenizer, REPEATED + OTHER, [], cfg)
    ids = encode_texts(tiny.tokenizer, REPEATED + OTHER)
    finetune(b, tiny.tokenizer, ids, [], cfg)
    assert _same_state(state_copy(a), state_copy(b))
    assert not _same_state(state_copy(a), state_copy(tiny.model))


def test_schedule_warms_up_then_decays_to_zero() -> None:
    factor = update._lr_lambda(total_steps=10, warmup_steps=2)
    values = [factor(s) for s in range(10)]
    assert values[:3] == [0.5, 1.0, 1.0]
    assert values == sorted(values[:2]) + sorted(values[2:], reverse=True)
    assert values[-1] > 0 and factor(10) == 0.0
    assert update._lr_lambda(5, 0)(0) == 1.0


def test_bad_config_and_empty_training_set_are_refused(tiny: LoadedBase) -> None:
    with pytest.raises(ValueError):
        TrainConfig(autocast="fp8")
    with pytest.raises(ValueError):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="nothing to train"):
        finetune(_fresh(tiny), tiny.tokenizer, ["", ""], [], TrainConfig())


def test_a_round_caps_onednn_cache_unless_the_operator_set_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.rounds.train_modes import ONEDNN_CACHE, limit_onednn_cache

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    limit_onednn_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(ONEDNN_CACHE)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    limit_onednn_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"
