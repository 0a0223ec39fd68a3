"""§8 (first half): Redis blackholed or cut in front of the broker.

The real app enqueues through our TCP proxy to the machine's Redis. While the proxy
blackholes (connections accepted, nothing answered) or cuts, `POST /update-rounds` answers
503 `unavailable` instead of hanging for minutes, and the round row it created is marked
failed so the lineage is not blocked; once Redis is reachable again the next round is
accepted. Champion announcements are bounded the same way.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import redis
from fastapi.testclient import TestClient

from app.main import create_app
from core.notify import announce
from core.settings import Settings
from tests.faults import TcpProxy

REDIS = os.environ.get("SELFLM_TEST_REDIS_URL", "redis://127.0.0.1:6379")
DB_INDEX = 14


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, make_tiny_settings: Callable[..., Settings]
) -> Iterator[tuple[TestClient, TcpProxy]]:
    u = urlparse(REDIS)
    redis.Redis.from_url(f"{REDIS}/{DB_INDEX}").flushdb()
    proxy = TcpProxy(u.hostname or "127.0.0.1", u.port or 6379)
    settings = make_tiny_settings(
        Path(tmp_path_factory.mktemp("redis")),
        broker_url=f"redis://127.0.0.1:{proxy.port}/{DB_INDEX}",
        broker_timeout_s=1.0,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client, proxy
    proxy.close()
    redis.Redis.from_url(f"{REDIS}/{DB_INDEX}").flushdb()


@pytest.mark.parametrize("mode", ["blackhole", "cut"])
def test_round_post_answers_503_and_frees_the_lineage(
    env: tuple[TestClient, TcpProxy], mode: Any
) -> None:
    client, proxy = env
    proxy.set_mode(mode)
    try:
        with cf.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(client.post, "/update-rounds", json={})
            # A hang detector, not a speed limit: the old code hung here for minutes.
            r = fut.result(timeout=120)
        assert r.status_code == 503, r.text
        assert r.json()["error_type"] == "unavailable"
        rounds = client.get("/update-rounds").json()["items"]
        assert rounds[0]["status"] == "failed" and "enqueue" in rounds[0]["error"]
        assert client.get("/health").status_code == 200  # serving is unaffected
    finally:
        proxy.set_mode("cut")
        proxy.set_mode("pass")
    ok = client.post("/update-rounds", json={})
    assert ok.status_code == 202, ok.text
    assert client.post(f"/update-rounds/{ok.json()['id']}/cancel").status_code == 200


def test_announce_is_bounded_when_redis_is_blackholed() -> None:
    u = urlparse(REDIS)
    with TcpProxy(u.hostname or "127.0.0.1", u.port or 6379) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/{DB_INDEX}"
        assert announce(url, "default", 3, timeout_s=1.0) is True
        proxy.set_mode("blackhole")
        with cf.ThreadPoolExecutor(1) as pool:
            assert pool.submit(announce, url, "default", 4, 1.0).result(timeout=60) is False
