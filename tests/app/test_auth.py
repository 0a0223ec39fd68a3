"""Access per route: with keys set, everything but /health and /info needs a bearer key;
groups can be opened by a setting; inference keys cannot mutate; CORS by origin list."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from core.settings import Settings

ADMIN = {"Authorization": "Bearer k1"}
CLIENT = {"Authorization": "Bearer c1"}
GEN = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
READS = ("/checkpoints", "/update-rounds", "/metrics", "/docs", "/openapi.json", "/v1/models")


@pytest.fixture(scope="module")
def keyed(
    tmp_path_factory: pytest.TempPathFactory, make_tiny_settings: Callable[..., Settings]
) -> Iterator[TestClient]:
    root: Path = tmp_path_factory.mktemp("auth")
    settings = make_tiny_settings(
        root,
        api_keys="k1, k2",
        inference_api_keys="c1",
        cors_origins="https://app.example",
    )
    with TestClient(create_app(settings)) as c:
        yield c


def test_mutating_routes_need_an_admin_key(keyed: TestClient) -> None:
    for path in ("/update-rounds", "/checkpoints/1/promote", "/update-rounds/1/cancel"):
        r = keyed.post(path, json={})
        assert r.status_code == 401, path
        assert r.json()["error_type"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        r = keyed.post(path, json={}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error_type"] == "unauthorized", path
        r = keyed.post(path, json={}, headers=CLIENT)  # an inference key may not mutate
        assert r.status_code == 403 and r.json()["error_type"] == "forbidden", path


def test_a_valid_key_is_accepted(keyed: TestClient) -> None:
    r = keyed.post("/checkpoints/1/promote", headers={"Authorization": "Bearer k2"})
    assert r.status_code == 200 and r.json()["champion_version"] == 1
    r = keyed.post("/update-rounds", json={"num_prompts": 1}, headers=ADMIN)
    assert r.status_code == 202  # queued on the embedded filesystem broker
    r = keyed.post(f"/update-rounds/{r.json()['id']}/cancel", headers=ADMIN)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"


def test_inference_needs_a_key(keyed: TestClient) -> None:
    for path in ("/generate", "/generate_stream", "/"):
        assert keyed.post(path, json=GEN).status_code == 401, path
        assert keyed.post(path, json=GEN, headers=CLIENT).status_code == 200, path
        assert keyed.post(path, json=GEN, headers=ADMIN).status_code == 200, path
    assert keyed.post("/tokenize", json={"inputs": "hi"}).status_code == 401
    r = keyed.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"  # OpenAI's envelope on /v1
    r = keyed.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=CLIENT)
    assert r.status_code == 200


def test_reads_need_a_key_but_health_does_not(keyed: TestClient) -> None:
    for path in READS:
        assert keyed.get(path).status_code == 401, path
        assert keyed.get(path, headers=CLIENT).status_code == 200, path
    assert keyed.get("/health").status_code == 200
    assert keyed.get("/info").status_code == 200


@pytest.mark.parametrize(
    "header",
    [
        "Bearer k1\u00e9",  # non-ASCII: a 401, never a 500
        "Bearer ключ",
        "Basic azE6",
        "Bearer",
        "Bearer    ",
        "k1",
    ],
)
def test_bad_tokens_are_401(keyed: TestClient, header: str) -> None:
    # Raw bytes on the wire, as a client in another encoding sends them.
    r = keyed.post("/generate", json=GEN, headers=[(b"authorization", header.encode())])
    assert r.status_code == 401, r.text


def test_cors_by_origin_list(keyed: TestClient) -> None:
    pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    r = keyed.options("/v1/chat/completions", headers=pre)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    r = keyed.options("/v1/chat/completions", headers={**pre, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_open_groups_and_cors_off_by_default(
    tmp_path: Path, make_tiny_settings: Callable[..., Settings]
) -> None:
    settings = make_tiny_settings(tmp_path, api_keys="k1", open_routes="metrics,docs,inference")
    with TestClient(create_app(settings)) as c:
        assert c.get("/metrics").status_code == 200
        assert c.get("/openapi.json").status_code == 200
        assert c.post("/generate", json=GEN).status_code == 200
        assert c.get("/checkpoints").status_code == 401  # reads were not opened
        assert c.post("/checkpoints/1/promote").status_code == 401  # admin never opens
        r = c.get("/health", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in r.headers


def test_unknown_open_group_is_refused(make_tiny_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ValueError, match="open_routes"):
        make_tiny_settings(Path("/tmp"), open_routes="admin")
