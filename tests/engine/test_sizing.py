"""The batch limit measured at load, and the warm-up every later load gets."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from app.engine import sizing
from core.modeling.loader import tiny_model


@pytest.fixture(scope="module")
def tiny() -> Any:
    base = tiny_model("llama", seed=3)
    base.model.eval()
    return base


def _prefill_widths(model: Any, run: Any) -> list[int]:
    """The sequence lengths of the forwards that `run()` makes with more than one position."""
    widths: list[int] = []

    def hook(_m: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:
            widths.append(int(ids.shape[1]))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return widths


def test_a_set_limit_is_a_short_warm_up_over_every_batch_size(tiny: Any) -> None:
    got: list[sizing.Sizing] = []
    widths = _prefill_widths(
        tiny.model,
        lambda: got.append(
            sizing.measure(tiny.model, torch.device("cpu"), 4096, 12, every_size=True)
        ),
    )
    assert got[0].limit == 12
    assert list(got[0].rows_per_s) == [1, 2, 4, 8, 12]
    # The warm-up's caches are what a swap holds beside two models: a short prompt.
    assert widths == [sizing.WARM_UP_CONTEXT]


def test_on_a_cpu_a_set_limit_warms_up_at_batch_one_only(tiny: Any) -> None:
    got = sizing.measure(tiny.model, torch.device("cpu"), 4096, 12)
    assert got.limit == 12
    assert list(got.rows_per_s) == [1]


def test_a_measured_limit_times_a_typical_prompt_within_floor_and_cap(tiny: Any) -> None:
    got: list[sizing.Sizing] = []
    widths = _prefill_widths(
        tiny.model,
        lambda: got.append(sizing.measure(tiny.model, torch.device("cpu"), 4096, None)),
    )
    assert widths == [sizing.MEASURE_CONTEXT]
    assert sizing.FLOOR <= got[0].limit <= sizing.CAP["cpu"]
    assert all(rate > 0 for rate in got[0].rows_per_s.values())
    assert got[0].memory_cap >= 1


def test_contexts_stay_inside_a_short_model_window(tiny: Any) -> None:
    widths = _prefill_widths(
        tiny.model, lambda: sizing.measure(tiny.model, torch.device("cpu"), 20, 4)
    )
    assert widths == [12]  # max_context - 8


def test_the_limit_is_the_largest_size_near_the_best_throughput() -> None:
    # Rising to a plateau: the largest size on the plateau, not the first that flattens.
    assert sizing.choose_limit({1: 10, 2: 19, 4: 35, 8: 60, 16: 80, 32: 82, 64: 83}, 64) == 64
    # A noisy dip in the middle does not stop the search below the knee.
    assert sizing.choose_limit({1: 10, 8: 60, 16: 50, 32: 90, 64: 70}, 64) == 32
    # Past the knee the throughput falls: sizes more than GAIN below the best are left out.
    assert sizing.choose_limit({1: 10, 8: 60, 16: 100, 32: 90, 64: 60}, 64) == 16
    # Never below the floor (a slow device that peaks at batch 2), never above the top.
    assert sizing.choose_limit({1: 10, 2: 12, 4: 9, 8: 5}, 8) == sizing.FLOOR
    assert sizing.choose_limit({1: 10, 2: 12, 4: 9}, 4) == 4
