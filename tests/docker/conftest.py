"""The docker tests run only when asked for: `-m docker` (scripts/ci-docker.sh does) or
SELFLM_DOCKER_TESTS=1. A plain `pytest` of the suite skips them: they build an image and
start a whole stack."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    asked = "docker" in (config.getoption("markexpr") or "") or os.environ.get(
        "SELFLM_DOCKER_TESTS", ""
    ) not in ("", "0")
    if asked:
        return
    skip = pytest.mark.skip(reason="docker stack test: run scripts/ci-docker.sh or pytest -m docker")
    for item in items:
        if "docker" in item.keywords:
            item.add_marker(skip)
