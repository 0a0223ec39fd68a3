"""Overload and abandonment (issue 12, point 9), against a real `selflm serve`.

With a small queue, a crowd of clients gets 429 with Retry-After while the admitted ones are
served; a client that disconnects mid-generation (streaming or not) frees its row at once;
a request past its deadline (X-Request-Timeout) gets 504 and frees its row.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from app.engine.admission import ServiceMeter, check_admission, retry_after
from app.engine.interface import EngineOverloadedError

LONG = 400  # tokens: tens of seconds on tiny:llama here, far longer than any check below


@pytest.fixture(scope="module")
def server(serve: Any) -> Any:
    return serve(max_queue=2, max_batch_size=2)


def wait_for(server: Any, pred: Any, what: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats: dict[str, Any] = server.engine_stats()
        if pred(stats):
            return stats
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: {server.engine_stats()}")


def idle(server: Any) -> dict[str, Any]:
    return wait_for(
        server, lambda s: s["requests_running"] == 0 and s["queue_depth"] == 0, "an idle engine"
    )


def test_a_crowd_gets_quick_429s_with_retry_after(server: Any) -> None:
    before = idle(server)
    done: list[tuple[float, int, httpx.Response]] = []
    lock = threading.Lock()

    def call(i: int) -> None:
        r = httpx.post(
            server.url + "/generate",
            json={"inputs": f"Request {i}:", "parameters": {"max_new_tokens": 40}},
            timeout=600,
        )
        with lock:
            done.append((time.monotonic(), r.status_code, r))

    with ThreadPoolExecutor(max_workers=16) as ex:
        list(ex.map(call, range(16)))

    shed = [(t, r) for t, code, r in done if code == 429]
    served = [(t, r) for t, code, r in done if code == 200]
    assert len(shed) + len(served) == 16, [code for _, code, _ in done]
    assert len(served) >= 3  # 2 queued + at least 1 already running
    assert len(shed) >= 6, f"only {len(shed)} of 16 were shed"
    for _, r in shed:
        assert r.json()["error_type"] == "overloaded"
        assert int(r.headers["retry-after"]) >= 1
    # Shed while the admitted ones were still being generated, not after waiting for them.
    assert max(t for t, _ in shed) < max(t for t, _ in served)
    after = idle(server)
    assert after["shed_total"] - before["shed_total"] == len(shed)


def test_a_streaming_client_that_disconnects_frees_its_row(server: Any) -> None:
    before = idle(server)
    body = {"inputs": "Tell me a story", "parameters": {"max_new_tokens": LONG}}
    with (
        httpx.Client(timeout=60) as c,
        c.stream("POST", server.url + "/generate_stream", json=body) as r,
    ):
        assert r.status_code == 200
        events: list[str] = []
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(line)
            if len(events) == 3:
                break
        assert server.engine_stats()["requests_running"] == 1
    # The connection is closed: the row leaves its batch long before LONG tokens.
    after = wait_for(server, lambda s: s["requests_running"] == 0, "the row to be freed")
    assert after["cancelled_total"] == before["cancelled_total"] + 1
    assert after["requests_total"] == before["requests_total"] + 1


def test_a_client_that_gives_up_on_generate_frees_its_row(server: Any) -> None:
    before = idle(server)
    body = {"inputs": "Tell me a story", "parameters": {"max_new_tokens": LONG}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/generate", json=body, timeout=httpx.Timeout(60, read=3))
    after = wait_for(server, lambda s: s["requests_running"] == 0, "the row to be freed")
    assert after["cancelled_total"] == before["cancelled_total"] + 1


def test_a_request_past_its_deadline_gets_504_and_frees_its_row(server: Any) -> None:
    before = idle(server)
    r = httpx.post(
        server.url + "/generate",
        json={"inputs": "Tell me a story", "parameters": {"max_new_tokens": LONG}},
        headers={"X-Request-Timeout": "2"},
        timeout=120,
    )
    assert r.status_code == 504, r.text
    assert r.json()["error_type"] == "timeout"
    after = wait_for(server, lambda s: s["requests_running"] == 0, "the row to be freed")
    assert after["expired_total"] == before["expired_total"] + 1


def test_a_stream_past_its_deadline_ends_with_an_error_event(server: Any) -> None:
    before = idle(server)
    body = {"inputs": "Tell me a story", "parameters": {"max_new_tokens": LONG}}
    with httpx.Client(timeout=120) as c:
        r = c.post(server.url + "/generate_stream", json=body, headers={"X-Request-Timeout": "3"})
    assert r.status_code == 200
    events = [json.loads(x.removeprefix("data:")) for x in r.text.split("\n\n") if x.strip()]
    assert events[-1]["error_type"] == "timeout", events[-1]
    assert 0 < len(events) - 1 < LONG  # some tokens, then the error
    after = wait_for(server, lambda s: s["requests_running"] == 0, "the row to be freed")
    assert after["expired_total"] == before["expired_total"] + 1


def test_a_bad_deadline_header_is_a_422(server: Any) -> None:
    for value in ("soon", "-1", "nan", "0"):
        r = httpx.post(
            server.url + "/generate",
            json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
            headers={"X-Request-Timeout": value},
            timeout=60,
        )
        assert r.status_code == 422, (value, r.text)
        assert "X-Request-Timeout" in r.json()["error"]


# --------------------------------------------------------------------------- the rule itself


def test_shedding_rule_uses_depth_measured_rate_and_deadline() -> None:
    check_admission(depth=5, max_queue=10, max_wait_s=30, rate=None, budget_s=None)
    with pytest.raises(EngineOverloadedError) as full:
        check_admission(depth=10, max_queue=10, max_wait_s=30, rate=2.0, budget_s=None)
    assert full.value.retry_after == 1  # one request over, at 2/s
    with pytest.raises(EngineOverloadedError) as slow:
        check_admission(depth=100, max_queue=256, max_wait_s=30, rate=2.0, budget_s=None)
    assert slow.value.retry_after == 20  # 50 s of queue, 30 s allowed
    check_admission(depth=50, max_queue=256, max_wait_s=30, rate=2.0, budget_s=None)
    with pytest.raises(EngineOverloadedError) as tight:
        check_admission(depth=50, max_queue=256, max_wait_s=30, rate=2.0, budget_s=5)
    assert "deadline" in str(tight.value)
    assert retry_after(1e9, 1.0) == 600  # capped


def test_service_rate_counts_every_slot() -> None:
    meter = ServiceMeter(slots=4)
    assert meter.rate() is None  # nothing finished yet: no estimate, no time-based shedding
    for seconds in (1.0, 3.0):
        meter.record(seconds)
    assert meter.rate() == 2.0  # 4 rows side by side, 2 s each
