"""`selflm serve` caps oneDNN's primitive cache before its first torch op (an operator's own
ONEDNN_PRIMITIVE_CACHE_CAPACITY is kept): each cached primitive keeps its own buffers, and
serving meets a new matmul shape with every batch size and packed prefill."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core.modeling.onednn import ONEDNN_CACHE_ENV, SERVE_ONEDNN_CACHE
from core.settings import Settings
from selflm import cli


@pytest.mark.parametrize(
    ("operator", "expected"), [(None, str(SERVE_ONEDNN_CACHE)), ("512", "512")]
)
def test_serve_sets_the_cache_cap_before_the_app_starts(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_tiny_settings: Callable[..., Settings],
    operator: str | None,
    expected: str,
) -> None:
    import uvicorn

    from core.modeling import onednn

    # setenv first, so monkeypatch restores the variable's original state (cmd_serve sets it
    # in this process's environment) and the record of what was set here.
    monkeypatch.setenv(ONEDNN_CACHE_ENV, operator or "")
    if operator is None:
        monkeypatch.delenv(ONEDNN_CACHE_ENV)
    monkeypatch.setattr(onednn, "_SET_HERE", {})
    seen: dict[str, Any] = {}

    def run(app: Any, **kwargs: Any) -> None:  # instead of serving: what the server would see
        import os

        seen["cap"] = os.environ.get(ONEDNN_CACHE_ENV)
        seen["port"] = kwargs["port"]

    monkeypatch.setattr(uvicorn, "run", run)
    assert cli.cmd_serve(make_tiny_settings(tmp_path), "127.0.0.1", 8765) == 0
    assert seen == {"cap": expected, "port": 8765}
