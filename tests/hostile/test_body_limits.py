"""Large bodies must not freeze the server (issue 12, point 3), against a real server.

A 50 MB body is refused with 413 as it arrives while /health, polled from another thread,
keeps answering; a body that fits the limit but tokenizes for seconds does so off the event
loop and is refused for its length (422, saying the limit).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

MAX_BODY = 4_000_000


@pytest.fixture(scope="module")
def server(serve: Callable[..., Any]) -> Any:
    return serve(max_body_bytes=MAX_BODY)


class HealthPoller:
    """Polls /health from its own thread; every poll must answer 200 within 5 s."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.codes: list[int] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as c:
            while not self._stop.is_set():
                try:
                    self.codes.append(c.get(self.url + "/health").status_code)
                except httpx.HTTPError as e:
                    self.failures.append(repr(e))
                time.sleep(0.05)

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def check(self) -> None:
        assert not self.failures, f"/health stopped answering: {self.failures[:3]}"
        assert self.codes and set(self.codes) == {200}, self.codes


def test_50mb_body_is_refused_while_health_keeps_answering(server: Any) -> None:
    body = b'{"inputs": "' + b"a" * 50_000_000 + b'"}'
    with HealthPoller(server.url) as poller:
        r = httpx.post(
            server.url + "/generate",
            content=body,
            headers={"content-type": "application/json"},
            timeout=120,
        )
        time.sleep(1)  # a few polls after the refusal too
    assert r.status_code == 413, r.text
    assert r.json() == {
        "error": f"request body is larger than the limit of {MAX_BODY} bytes",
        "error_type": "too_large",
    }
    poller.check()


def test_a_body_without_content_length_is_counted_as_it_streams(server: Any) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": "'
        for _ in range(50):  # 50 MB in 1 MB chunks, no Content-Length (chunked)
            yield b"a" * 1_000_000
        yield b'"}'

    with HealthPoller(server.url) as poller:
        r = httpx.post(
            server.url + "/generate",
            content=chunks(),
            headers={"content-type": "application/json"},
            timeout=120,
        )
    assert r.status_code == 413, r.text
    assert r.json()["error_type"] == "too_large"
    poller.check()


def test_413_on_openai_routes_too(server: Any) -> None:
    r = httpx.post(
        server.url + "/v1/completions",
        content=b'{"prompt": "' + b"a" * (MAX_BODY + 10) + b'"}',
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413, r.text
    assert "error" in r.json()


def test_long_prompt_is_tokenized_off_the_event_loop_and_refused(server: Any) -> None:
    # Under the body limit, but ~1M tokens: seconds of tokenizing, while /health answers.
    prompt = "hello world, this is a test. " * (3_500_000 // 29)
    with HealthPoller(server.url) as poller:
        r = httpx.post(server.url + "/generate", json={"inputs": prompt}, timeout=120)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error_type"] == "validation"
    assert "must be <= 512" in body["error"]  # the model's context, said in the message
    poller.check()
