"""The routes the CLI and the dashboard read: /checkpoints' path/size/parent, /info's lineage,
a checkpoint's files (the manifest is the allow-list; the API key guards them when set)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from core.settings import Settings


@pytest.fixture(scope="module")
def keyed(
    tmp_path_factory: pytest.TempPathFactory, make_tiny_settings: Callable[..., Settings]
) -> Iterator[TestClient]:
    settings = make_tiny_settings(tmp_path_factory.mktemp("keyed"), api_keys="sesame")
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def test_checkpoints_show_path_size_and_parent(client: Any) -> None:
    item = client.get("/checkpoints").json()["items"][0]
    assert item["version"] == 1 and item["parent_version"] is None
    files = [p for p in Path(item["path"]).iterdir() if p.name != "manifest.json"]
    assert item["size_bytes"] == sum(p.stat().st_size for p in files) > 0


def test_info_shows_the_lineage(client: Any) -> None:
    info = client.get("/info").json()
    assert info["champion_version"] == 1 and info["lineage_versions"] == [1]
    assert info["max_total_tokens"] > 0  # TGI's fields stay
    lineage = client.get("/info/lineage").json()
    assert lineage["serving_version"] == 1 and lineage["checkpoints"][0]["status"] == "champion"


def test_checkpoint_files_are_the_manifest_s_files(client: Any) -> None:
    listing = client.get("/checkpoints/1/files").json()
    names = {f["name"] for f in listing["files"]}
    assert {"config.json", "model.safetensors"} <= names and "manifest.json" not in names
    f = next(f for f in listing["files"] if f["name"] == "config.json")
    r = client.get("/checkpoints/1/files/config.json")
    assert r.status_code == 200 and len(r.content) == f["size"]
    assert hashlib.sha256(r.content).hexdigest() == f["sha256"] == r.headers["x-checksum-sha256"]
    for bad in ("manifest.json", "nope.bin", "..%2Fselflm.db", "../../selflm.db"):
        assert client.get(f"/checkpoints/1/files/{bad}").status_code == 404, bad
    assert client.get("/checkpoints/9/files").status_code == 404
    assert client.get(f"/checkpoints/{2**40}/files").status_code == 422


def test_checkpoint_files_need_the_key_when_keys_are_set(keyed: TestClient) -> None:
    assert keyed.get("/checkpoints/1/files").status_code == 401
    bad = {"authorization": "Bearer nope"}
    assert keyed.get("/checkpoints/1/files/config.json", headers=bad).status_code == 401
    ok = {"authorization": "Bearer sesame"}
    assert keyed.get("/checkpoints/1/files", headers=ok).status_code == 200
    assert keyed.get("/dashboard").status_code == 200  # the page itself is public
