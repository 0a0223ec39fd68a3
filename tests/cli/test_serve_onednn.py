"""`selflm serve` caps both oneDNN primitive caches (oneDNN's own and PyTorch's ideep cache)
before its first torch op, keeping an operator's own value of either variable: each cached
primitive keeps its own buffers, and serving meets a new matmul shape with every batch size
and prefill length."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core.modeling.onednn import IDEEP_CACHE_ENV, ONEDNN_CACHE_ENV, SERVE_ONEDNN_CACHE
from core.settings import Settings
from selflm import cli

CAP = str(SERVE_ONEDNN_CACHE)


@pytest.mark.parametrize(
    ("operator", "expected"),
    [
        ({}, {ONEDNN_CACHE_ENV: CAP, IDEEP_CACHE_ENV: CAP}),
        ({ONEDNN_CACHE_ENV: "512"}, {ONEDNN_CACHE_ENV: "512", IDEEP_CACHE_ENV: CAP}),
        ({IDEEP_CACHE_ENV: "1"}, {ONEDNN_CACHE_ENV: CAP, IDEEP_CACHE_ENV: "1"}),
    ],
)
def test_serve_sets_the_cache_caps_before_the_app_starts(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_tiny_settings: Callable[..., Settings],
    operator: dict[str, str],
    expected: dict[str, str],
) -> None:
    import uvicorn

    from core.modeling import onednn

    # setenv first, so monkeypatch restores each variable's original state (cmd_serve sets
    # them in this process's environment) and the record of what was set here.
    for name in (ONEDNN_CACHE_ENV, IDEEP_CACHE_ENV):
        monkeypatch.setenv(name, operator.get(name, ""))
        if name not in operator:
            monkeypatch.delenv(name)
    monkeypatch.setattr(onednn, "_SET_HERE", {})
    seen: dict[str, Any] = {}

    def run(app: Any, **kwargs: Any) -> None:  # instead of serving: what the server would see
        import os

        seen["caps"] = {n: os.environ.get(n) for n in (ONEDNN_CACHE_ENV, IDEEP_CACHE_ENV)}
        seen["port"] = kwargs["port"]

    monkeypatch.setattr(uvicorn, "run", run)
    assert cli.cmd_serve(make_tiny_settings(tmp_path), "127.0.0.1", 8765) == 0
    assert seen == {"caps": expected, "port": 8765}
    # What a round must not pass on to a server it starts: only what was set here.
    assert sorted(onednn.set_here()) == sorted(set(expected) - set(operator))
