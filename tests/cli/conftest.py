"""A live `selflm serve` (PostgreSQL, its own Celery worker, tiny:llama) for the CLI tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import live_server


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, pg_module_db_url: str
) -> Iterator[live_server.LiveServer]:
    server = live_server.start(tmp_path_factory.mktemp("cli"), pg_module_db_url)
    try:
        yield server
    finally:
        live_server.stop(server)
