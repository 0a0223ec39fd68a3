"""GET /metrics: JSON by default, Prometheus text on request."""

from __future__ import annotations

from fastapi.testclient import TestClient


def test_metrics_json(client: TestClient) -> None:
    body = client.get("/metrics").json()
    assert body["champion_version"] == 1
    assert body["checkpoints"][0]["version"] == 1
    assert body["checkpoints"][0]["status"] == "champion"
    assert isinstance(body["rounds"], list)


def test_metrics_prometheus(client: TestClient) -> None:
    client.post("/generate", json={"inputs": "count me", "parameters": {"max_new_tokens": 3}})
    for r in (
        client.get("/metrics?format=prometheus"),
        client.get("/metrics", headers={"accept": "text/plain"}),
    ):
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        lines = dict(line.rsplit(" ", 1) for line in r.text.splitlines() if line and line[0] != "#")
        assert lines["selflm_serving_version"] == "1.0"
        assert lines["selflm_champion_version"] == "1.0"
        assert float(lines["selflm_requests_total"]) >= 1
        assert float(lines["selflm_generated_tokens_total"]) >= 1
        assert "# TYPE selflm_requests_total counter" in r.text
    assert client.get("/metrics?format=xml").status_code == 422
