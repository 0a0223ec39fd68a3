"""One request must not fail the batch (issue 12, point 1).

The real batching engine of a running app gets poisoned rows straight from SamplingParams
(past the edge's validation): temperatures and repetition penalties that over- or underflow
float32, NaN, a type torch cannot divide by, and a row whose token callback raises (its
client's event loop is gone). They share batches with healthy rows, greedy and seeded
sampling, which must produce exactly the text they produce alone. The edge refuses the
same values with 422.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.engine.interface import GenerationResult
from app.main import create_app
from core.modeling.params import SamplingParams

PROMPTS = ["The quick brown fox", "def main():\n    return", "Once upon a time", "Hi"]
HEALTHY = [
    SamplingParams(max_new_tokens=12),
    SamplingParams(max_new_tokens=10, repetition_penalty=1.3),
    SamplingParams(max_new_tokens=12, do_sample=True, seed=7, temperature=0.8, top_p=0.9),
    SamplingParams(max_new_tokens=12, do_sample=True, seed=11, temperature=0.7),  # full path
]
# Values the edge refuses, sent to the engine directly: each must finish (as the greedy
# limit such values tend to) or fail alone.
DEGENERATE = [
    SamplingParams(max_new_tokens=8, do_sample=True, temperature=1e-50),
    SamplingParams(max_new_tokens=8, do_sample=True, temperature=math.nan),
    SamplingParams(max_new_tokens=8, do_sample=True, temperature=math.nan, top_p=0.9),
    SamplingParams(max_new_tokens=8, do_sample=True, repetition_penalty=math.nan),
    SamplingParams(max_new_tokens=8, do_sample=True, repetition_penalty=1e-320),
    SamplingParams(max_new_tokens=8, do_sample=True, temperature=0.0, top_k=5),
]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, make_tiny_settings: Any) -> Iterator[Any]:
    # A long batch wait: everything submitted together lands in one batch.
    settings = make_tiny_settings(tmp_path_factory.mktemp("iso"), batch_wait_ms=400)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def engine(client: Any) -> Any:
    return client.app.state.selflm.engine


def alone(client: Any, prompt: str, params: SamplingParams) -> str:
    result: GenerationResult = engine(client).submit(prompt, params).result(timeout=300)
    return result.text


def closed_loop_callback() -> Any:
    loop = asyncio.new_event_loop()
    loop.close()
    return lambda tok, lp: loop.call_soon_threadsafe(print, tok)  # RuntimeError: closed


def test_poisoned_rows_fail_alone_and_neighbours_match_solo(client: Any) -> None:
    eng = engine(client)
    solo = [alone(client, p, params) for p, params in zip(PROMPTS, HEALTHY, strict=True)]
    errors_before, batches_before = eng.row_errors, eng.batches

    futures: list[tuple[str, Future[GenerationResult]]] = []
    for i, params in enumerate(DEGENERATE):
        futures.append(("degenerate", eng.submit(PROMPTS[i % 4], params, details=True)))
        if i < len(HEALTHY):
            futures.append(("healthy", eng.submit(PROMPTS[i], HEALTHY[i])))
    bad_type = SamplingParams(max_new_tokens=8, do_sample=True, temperature=None)  # type: ignore[arg-type]
    futures.append(("fails", eng.submit("Hello", bad_type)))
    futures.append(
        (
            "fails",
            eng.submit("Hello", SamplingParams(max_new_tokens=8), on_token=closed_loop_callback()),
        )
    )

    healthy_texts: list[str] = []
    for kind, fut in futures:
        if kind == "fails":
            with pytest.raises((TypeError, RuntimeError)):
                fut.result(timeout=300)
            continue
        result = fut.result(timeout=300)  # a healthy or degenerate row never raises
        if kind == "healthy":
            healthy_texts.append(result.text)
        else:
            assert result.finish_reason in ("length", "eos_token")
            assert all(math.isfinite(t.logprob) for t in result.tokens), result.tokens
    assert healthy_texts == solo
    assert eng.row_errors - errors_before == 2  # the two rows that failed, nobody else
    assert eng.batches - batches_before <= 2, "the rows were not batched together"
    assert eng.health()["batcher_alive"]


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ('{"temperature": NaN}', "temperature"),
        ('{"temperature": 1e-50}', "temperature"),
        ('{"temperature": Infinity}', "temperature"),
        ('{"repetition_penalty": NaN, "do_sample": true}', "repetition_penalty"),
        ('{"repetition_penalty": 1e-320, "do_sample": true}', "repetition_penalty"),
        ('{"top_p": NaN}', "top_p"),
    ],
)
def test_edge_refuses_non_finite_and_degenerate_values(
    client: Any, parameters: str, field: str
) -> None:
    body = '{"inputs": "Hello", "parameters": ' + parameters + "}"
    for route in ("/generate", "/generate_stream"):
        r = client.post(route, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["error_type"] == "validation"
        assert field in r.json()["error"]


def test_openai_route_refuses_nan(client: Any) -> None:
    r = client.post(
        "/v1/completions",
        content='{"prompt": "Hello", "temperature": NaN}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code in (400, 422), r.text  # OpenAI's dialect may say 400


def test_tiny_openai_temperature_is_served_as_its_greedy_limit(client: Any) -> None:
    # OpenAI allows any temperature in [0, 2]; 1e-50 reaches the engine and must not fail.
    greedy = client.post("/v1/completions", json={"prompt": "Hello", "temperature": 0})
    tiny = client.post("/v1/completions", json={"prompt": "Hello", "temperature": 1e-50})
    assert greedy.status_code == tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
