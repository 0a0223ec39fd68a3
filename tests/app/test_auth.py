"""Mutating routes need a bearer key when SELFLM_API_KEYS is set; reads and /generate do not."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from core.settings import Settings


@pytest.fixture(scope="module")
def keyed(
    tmp_path_factory: pytest.TempPathFactory, make_tiny_settings: Callable[..., Settings]
) -> Iterator[TestClient]:
    root: Path = tmp_path_factory.mktemp("auth")
    settings = make_tiny_settings(root, api_keys="k1, k2")
    with TestClient(create_app(settings)) as c:
        yield c


def test_mutating_routes_need_a_key(keyed: TestClient) -> None:
    for path in ("/update-rounds", "/checkpoints/1/promote", "/update-rounds/1/cancel"):
        r = keyed.post(path, json={})
        assert r.status_code == 401, path
        assert r.json()["error_type"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        r = keyed.post(path, json={}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 403 and r.json()["error_type"] == "forbidden", path


def test_a_valid_key_is_accepted(keyed: TestClient) -> None:
    r = keyed.post("/checkpoints/1/promote", headers={"Authorization": "Bearer k2"})
    assert r.status_code == 200 and r.json()["champion_version"] == 1
    r = keyed.post(
        "/update-rounds", json={"num_prompts": 1}, headers={"Authorization": "Bearer k1"}
    )
    assert r.status_code == 202  # queued on the embedded filesystem broker
    r = keyed.post(
        f"/update-rounds/{r.json()['id']}/cancel", headers={"Authorization": "Bearer k1"}
    )
    assert r.status_code == 200 and r.json()["status"] == "cancelled"


def test_reads_and_generation_need_no_key(keyed: TestClient) -> None:
    assert keyed.get("/checkpoints").status_code == 200
    assert keyed.get("/update-rounds").status_code == 200
    assert keyed.get("/metrics").status_code == 200
    r = keyed.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200
