"""The environment of the `selflm serve` the served arm's traffic replay starts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from studies.quality.traffic import _server_env
from worker.rounds.train_modes import limit_onednn_cache


def test_a_server_the_study_starts_does_not_inherit_the_rounds_cache_cap(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The served arm's replay server is a serving process: it sets its own cache cap."""
    store = SimpleNamespace(
        database_url="sqlite://",
        checkpoint_dir=tmp_path,
        base_model="tiny:llama",
        lineage="default",
        device="cpu",
    )
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    limit_onednn_cache()  # as a round in the study's process does
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in _server_env(store)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")  # the operator's: kept
    assert _server_env(store)["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"
