"""§7: a database partition must not spread to inference.

The real app talks to the machine's PostgreSQL through our own TCP proxy (tests/faults.py).
While the proxy blackholes (connections open, nothing answered) or cuts the connection:
/generate keeps answering, DB routes answer 503 `unavailable` within the timeouts (not 500,
not a hang), /health stays 200 "degraded" (liveness) and /health/ready is 503; once the
proxy passes again everything is back without a restart.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from app.main import create_app
from core.db.session import upgrade
from core.settings import Settings
from tests.faults import TcpProxy

GEN = {"inputs": "The database is down but", "parameters": {"max_new_tokens": 4}}


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory,
    pg_module_db_url: str,
    make_tiny_settings: Callable[..., Settings],
) -> Iterator[tuple[TestClient, TcpProxy]]:
    upgrade(pg_module_db_url)
    url = make_url(pg_module_db_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    settings = make_tiny_settings(
        Path(tmp_path_factory.mktemp("partition")),
        database_url=proxied,
        db_connect_timeout_s=1,
        db_statement_timeout_s=1.0,
        db_pool_timeout_s=1.0,
        poll_interval_s=0.5,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client, proxy
    proxy.close()


def _db_routes(client: TestClient) -> dict[str, int]:
    return {
        "rounds": client.get("/update-rounds").status_code,
        "checkpoints": client.get("/checkpoints").status_code,
        # The JSON report reads the database; the Prometheus text stays up (see below).
        "metrics": client.get("/metrics", headers={"accept": "application/json"}).status_code,
    }


@pytest.mark.parametrize("mode", ["blackhole", "cut"])
def test_partition_keeps_inference_and_turns_db_routes_into_503(
    env: tuple[TestClient, TcpProxy], mode: Any
) -> None:
    client, proxy = env
    assert set(_db_routes(client).values()) == {200}
    proxy.set_mode(mode)
    try:
        # Many DB requests at once, each stuck up to the client deadline, while /generate is
        # called: with a sync get_state or an unbounded DB call these starved inference.
        with cf.ThreadPoolExecutor(48) as pool:
            stuck = [pool.submit(client.get, "/update-rounds") for _ in range(44)]
            gens = [pool.submit(client.post, "/generate", json=GEN) for _ in range(4)]
            gen_codes = [f.result().status_code for f in gens]
            db_replies = [f.result() for f in stuck]
        assert gen_codes == [200] * 4
        assert {r.status_code for r in db_replies} == {503}
        body = db_replies[0].json()
        assert body["error_type"] == "unavailable" and "database" in body["error"]
        assert db_replies[0].headers.get("retry-after")
        assert set(_db_routes(client).values()) == {503}
        # Serving metrics are still scraped; the round numbers say the database is gone.
        scrape = client.get("/metrics")
        assert scrape.status_code == 200 and "selflm_database_up 0.0" in scrape.text
        h = client.get("/health")
        assert h.status_code == 200 and h.json()["status"] == "degraded"
        assert h.json()["database"] is False
        assert client.get("/health/live").status_code == 200
        assert client.get("/health/ready").status_code == 503
        assert client.post("/generate", json=GEN).status_code == 200
    finally:
        proxy.set_mode("cut")  # reset connections the blackhole left hanging
        proxy.set_mode("pass")
    assert set(_db_routes(client).values()) == {200}
    assert client.get("/health/ready").status_code == 200
    assert client.get("/health").json()["status"] == "ok"
