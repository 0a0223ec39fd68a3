"""GET /metrics: Prometheus text by content negotiation, the JSON report when asked for."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
from prometheus_client.parser import text_string_to_metric_families as text_format

from app.routes.metrics import negotiate

SCRAPE = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def test_negotiation() -> None:
    assert negotiate(SCRAPE, None) == "openmetrics"
    assert negotiate("text/plain;version=0.0.4", None) == "prometheus"
    assert negotiate("*/*", None) == "prometheus"
    assert negotiate("", None) == "prometheus"
    assert negotiate("application/json", None) == "json"
    assert negotiate("*/*", "json") == "json"


def test_metrics_json_when_asked(client: TestClient) -> None:
    for r in (
        client.get("/metrics", headers={"accept": "application/json"}),
        client.get("/metrics?format=json"),
    ):
        body = r.json()
        assert body["champion_version"] == 1
        assert body["checkpoints"][0]["version"] == 1
        assert body["checkpoints"][0]["status"] == "champion"
        assert isinstance(body["rounds"], list)


def _samples(text: str, parse: object = text_format) -> dict[str, float]:
    out = {}
    for fam in parse(text):  # type: ignore[operator]
        for s in fam.samples:
            key = s.name + "".join(f"|{k}={v}" for k, v in sorted(s.labels.items()))
            out[key] = s.value
    return out


def test_metrics_prometheus_text(client: TestClient) -> None:
    client.post("/generate", json={"inputs": "count me", "parameters": {"max_new_tokens": 3}})
    client.post("/generate", json={"inputs": "", "parameters": {}})  # a validation failure
    for r in (
        client.get("/metrics?format=prometheus"),
        client.get("/metrics", headers={"accept": "text/plain"}),
        client.get("/metrics"),  # */*: text, not JSON
    ):
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        s = _samples(r.text)
        assert s["selflm_serving_version"] == 1
        assert s["selflm_champion_version"] == 1
        assert s["selflm_requests_total"] >= 1
        assert s["selflm_generated_tokens_total"] >= 1
        assert s["selflm_request_count_total|route=/generate"] >= 2
        assert s["selflm_request_success_total|route=/generate"] >= 1
        assert s["selflm_request_failure_total|err=validation|route=/generate"] >= 1
        assert s["selflm_e2e_request_latency_seconds_count"] >= 1
        assert s["selflm_request_generation_tokens_sum"] >= 1
        assert s["selflm_batch_size_count"] >= 1
        assert s["selflm_database_up"] == 1
        assert "# TYPE selflm_request_count_total counter" in r.text
    assert client.get("/metrics?format=xml").status_code == 422


def test_metrics_openmetrics_for_the_scraper(client: TestClient) -> None:
    r = client.get("/metrics", headers={"accept": SCRAPE})
    assert r.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert r.text.endswith("# EOF\n")
    s = _samples(r.text, openmetrics)
    assert s["selflm_num_requests_waiting"] == 0
    assert "selflm_rounds" not in s or s["selflm_rounds"] >= 0


def test_round_metrics_from_the_database(client: TestClient) -> None:
    """Rounds by status/decision and stage seconds come from the database at scrape time."""
    from core.db.models import RoundMetric, UpdateRound

    db = client.app.state.selflm.db  # type: ignore[attr-defined]
    with db.session() as s:
        r = UpdateRound(lineage="default", status="succeeded", decision="rejected", params={})
        s.add(r)
        s.flush()
        s.add(RoundMetric(round_id=r.id, stage="update", name="seconds", value=12.5))
        s.add(RoundMetric(round_id=r.id, stage="generate", name="seconds", value=2.0))
    s2 = _samples(client.get("/metrics").text)
    assert s2["selflm_rounds|decision=rejected|status=succeeded"] == 1
    assert s2["selflm_round_stage_seconds_sum|stage=update"] == 12.5
    assert s2["selflm_round_stage_seconds_count|stage=generate"] == 1
