"""Hot swap across real API processes: under load, across replicas, refusal, rollback."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from core import registry
from core.db.models import Checkpoint
from core.db.session import Database, upgrade
from core.modeling.loader import tiny_model
from core.registry import ensure_base_checkpoint, set_champion
from core.settings import Settings

REDIS = os.environ.get("SELFLM_TEST_REDIS_URL", "redis://127.0.0.1:6379") + "/12"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Replica:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


def start_replica(tmp: Path, env: dict[str, str], name: str) -> Replica:
    port = free_port()
    log = tmp / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "selflm.cli", "serve", "--port", str(port)],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=tmp,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return Replica(url, proc, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"{name} did not become healthy:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, pg_module_db_url: str
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("swap")
    settings = Settings(
        database_url=pg_module_db_url,
        checkpoint_dir=str(tmp / "ck"),
        base_model="tiny:llama",
        embedded_worker=False,
    )
    upgrade(settings.database_url)
    db = Database(settings.database_url)
    ensure_base_checkpoint(settings, db)
    # Versions 2 and 3: differently seeded tiny models, recorded as candidates.
    for version in (2, 3):
        base = tiny_model("llama", seed=version)
        ref = registry.publish(
            db,
            settings.checkpoint_dir,
            "default",
            base.model,
            base.tokenizer,
            parent_version=version - 1,
            source=f"test seed {version}",
        )
        assert ref.version == version
    env = dict(os.environ)
    env.update(
        SELFLM_DATABASE_URL=settings.database_url,
        SELFLM_CHECKPOINT_DIR=settings.checkpoint_dir,
        SELFLM_BASE_MODEL="tiny:llama",
        SELFLM_EMBEDDED_WORKER="false",
        SELFLM_POLL_INTERVAL_S="1",
        SELFLM_MAX_BATCH_SIZE="8",
    )
    with_redis = {**env, "SELFLM_REDIS_URL": REDIS}
    a = start_replica(tmp, with_redis, "a")
    b = start_replica(tmp, with_redis, "b")
    try:
        yield {"a": a, "b": b, "db": db, "settings": settings, "tmp": tmp, "env": env}
    finally:
        for r in (a, b):
            r.proc.terminate()
            r.proc.wait(timeout=30)
        db.dispose()


def serving(r: Replica) -> int:
    return int(httpx.get(r.url + "/health", timeout=5).json()["serving_version"])


def wait_version(r: Replica, version: int, timeout: float = 60) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if serving(r) == version:
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(
        f"{r.url} never served v{version}; health {httpx.get(r.url + '/health').json()}"
    )


@dataclass
class Load:
    """N client threads sending /generate until stopped; every outcome is kept."""

    url: str
    clients: int = 8
    results: list[tuple[float, float, int, int | None]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _client(self, i: int) -> None:
        with httpx.Client(timeout=60) as c:
            n = 0
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    r = c.post(
                        self.url + "/generate",
                        json={
                            "inputs": f"client {i} request {n}",
                            "parameters": {"max_new_tokens": 8},
                        },
                    )
                    version = int(r.headers["x-model-version"]) if r.status_code == 200 else None
                    self.results.append((t0, time.monotonic(), r.status_code, version))
                except httpx.HTTPError:
                    self.results.append((t0, time.monotonic(), 0, None))
                n += 1

    def __enter__(self) -> Load:
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True)
            for i in range(self.clients)
        ]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def promote_http(r: Replica, version: int) -> httpx.Response:
    return httpx.post(f"{r.url}/checkpoints/{version}/promote", timeout=30)


def test_swap_under_load_drops_nothing(cluster: dict[str, Any]) -> None:
    a, b = cluster["a"], cluster["b"]
    with Load(a.url, clients=8) as load:
        time.sleep(2)
        t_promote = time.monotonic()
        assert promote_http(a, 2).status_code == 200
        wait_version(a, 2)
        t_swapped = time.monotonic()
        wait_version(b, 2)
        time.sleep(2)
    res = sorted(load.results, key=lambda x: x[1])
    failed = [x for x in res if x[2] != 200]
    assert len(res) > 20 and not failed, failed[:5]
    assert {x[3] for x in res} <= {1, 2}
    # Requests sent after the swap completed are all served by the new version.
    after = [x for x in res if x[0] > t_swapped]
    assert after and all(x[3] == 2 for x in after)
    first_new = min(x[1] for x in res if x[3] == 2)
    window = [x[1] for x in res if t_promote - 1 <= x[1] <= t_swapped + 1]
    gap = max((b2 - b1 for b1, b2 in itertools.pairwise(window)), default=0.0)
    print(
        f"\nswap under load: {len(res)} requests, 0 failed, largest gap {gap * 1000:.0f} ms, "
        f"promotion→first v2 response {(first_new - t_promote) * 1000:.0f} ms"
    )
    info = httpx.get(a.url + "/info").json()
    assert info["model_version"] == 2 and info["loaded_at"]


def test_corrupted_checkpoint_is_refused(cluster: dict[str, Any]) -> None:
    a, b, db = cluster["a"], cluster["b"], cluster["db"]
    current = serving(a)
    with db.session() as s:
        row = s.scalars(sa.select(Checkpoint).where(Checkpoint.version == 3)).one()
        path = Path(row.path) / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    # The route verifies before promoting: it refuses a corrupt checkpoint outright.
    r = promote_http(a, 3)
    assert r.status_code == 409 and "verification" in r.json()["error"]
    # A corrupt champion reached behind the API's back is refused by every replica.
    with db.session() as s:
        set_champion(s, "default", 3)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        h = httpx.get(a.url + "/health").json()
        if h["swap_error"]:
            break
        time.sleep(0.2)
    assert h["serving_version"] == current and h["wanted_version"] == 3
    assert "checksum" in h["swap_error"] and h["status"] == "degraded"
    assert h["details"]["refused_total"] >= 1
    r = httpx.post(
        a.url + "/generate", json={"inputs": "still", "parameters": {"max_new_tokens": 2}}
    )
    assert r.status_code == 200 and r.headers["x-model-version"] == str(current)
    # Roll back by hand: the API promotes a verified version and both replicas follow.
    assert promote_http(b, 1).status_code == 200
    wait_version(a, 1)
    wait_version(b, 1)
    assert httpx.get(a.url + "/health").json()["swap_error"] is None


def test_replicas_catch_up_by_polling_without_redis(cluster: dict[str, Any]) -> None:
    env, tmp, db = cluster["env"], cluster["tmp"], cluster["db"]
    c = start_replica(tmp, env, "c")  # no SELFLM_REDIS_URL: polling only
    d = start_replica(tmp, env, "d")
    try:
        before = serving(c)
        target = 2 if before != 2 else 1
        with db.session() as s:
            set_champion(s, "default", target)  # no announcement at all
        t_c = wait_version(c, target, timeout=30)
        t_d = wait_version(d, target, timeout=30)
        print(f"\npolling replicas caught up in {t_c:.1f}s and {t_d:.1f}s")
    finally:
        for r in (c, d):
            r.proc.terminate()
            r.proc.wait(timeout=30)


def test_promote_unknown_version_is_404(cluster: dict[str, Any]) -> None:
    r = promote_http(cluster["a"], 999)
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"
    listing = httpx.get(cluster["a"].url + "/checkpoints").json()
    assert {c["version"] for c in listing["items"]} >= {1, 2, 3}


def test_concurrent_promotes_never_fail(cluster: dict[str, Any]) -> None:
    """20 promotions at once through both replicas: each is answered 200 (or 409 if it lost
    the lineage lock for good), never 500, and the lineage ends with exactly one champion,
    which both replicas then serve."""
    a, b, db = cluster["a"], cluster["b"], cluster["db"]
    barrier = threading.Barrier(20)
    codes: list[int] = []

    def go(i: int) -> None:
        barrier.wait()
        codes.append(promote_http(a if i % 2 else b, 1 + i % 2).status_code)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(codes) == 20 and set(codes) <= {200, 409}, codes
    assert codes.count(200) >= 1
    with db.session() as s:
        champs = s.scalars(sa.select(Checkpoint).where(Checkpoint.status == "champion")).all()
    assert len(champs) == 1 and champs[0].version in (1, 2)
    wait_version(a, champs[0].version)
    wait_version(b, champs[0].version)
