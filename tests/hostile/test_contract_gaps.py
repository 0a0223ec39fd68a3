"""Smaller 500s and contract gaps (issue 12, point 11), through the real app.

Ids, versions, offsets and seeds past 64 bits (and 31 bits, PostgreSQL's integer columns),
lone surrogates, SQLite timestamps without an offset, NaN in SSE JSON, and an OpenAPI
document that listed only 200/422 in a schema the service never sends.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.routes.stream import sse
from core.db.session import upgrade

BIG = [2**31, 2**63, 2**64, 10**30]
JSON = {"content-type": "application/json"}


def _app(settings: Any) -> Iterator[Any]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, make_tiny_settings: Any) -> Iterator[Any]:
    yield from _app(make_tiny_settings(tmp_path_factory.mktemp("gaps")))


@pytest.fixture(scope="module")
def pg_client(
    tmp_path_factory: pytest.TempPathFactory, make_tiny_settings: Any, pg_module_db_url: str
) -> Iterator[Any]:
    upgrade(pg_module_db_url)
    settings = make_tiny_settings(tmp_path_factory.mktemp("gaps_pg"), database_url=pg_module_db_url)
    yield from _app(settings)


def assert_422(r: Any) -> None:
    # /v1 answers in OpenAI's dialect, where an invalid request may be a 400.
    ok = (400, 422) if r.url.path.startswith("/v1/") else (422,)
    assert r.status_code in ok, (r.status_code, r.text)
    assert "error" in r.json()


# --------------------------------------------------------------------------- integers


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_ids_versions_offsets_past_the_integer_columns_are_422(
    db: str, request: pytest.FixtureRequest
) -> None:
    c = request.getfixturevalue("client" if db == "sqlite" else "pg_client")
    for n in BIG:
        assert_422(c.get(f"/update-rounds/{n}"))
        assert_422(c.post(f"/update-rounds/{n}/cancel"))
        assert_422(c.post(f"/checkpoints/{n}/promote"))
        assert_422(c.get("/update-rounds", params={"offset": n}))
    # The largest id that can exist is simply not found, on both databases.
    assert c.get(f"/update-rounds/{2**31 - 1}").status_code == 404
    assert c.post(f"/checkpoints/{2**31 - 1}/promote").status_code == 404
    assert c.get("/update-rounds", params={"offset": 2**31 - 1}).json()["items"] == []


def test_seeds_past_64_bits_are_422(client: Any) -> None:
    gen = {"inputs": "Hi", "parameters": {"do_sample": True, "max_new_tokens": 2}}
    for seed in (2**64, 10**30):
        gen["parameters"]["seed"] = seed  # type: ignore[index]
        assert_422(client.post("/generate", json=gen))
        assert_422(client.post("/v1/completions", json={"prompt": "Hi", "seed": seed}))
    # seed + i for the i-th of n choices must fit too.
    r = client.post("/v1/completions", json={"prompt": "Hi", "seed": 2**64 - 1, "n": 2})
    assert_422(r)
    assert client.post("/update-rounds", json={"seed": 2**64}).status_code == 422


# --------------------------------------------------------------------------- text


def test_lone_surrogates_are_422_everywhere(client: Any) -> None:
    bad = '"a\\ud800b"'
    bodies = {
        "/generate": '{"inputs": %s}',
        "/generate_stream": '{"inputs": %s}',
        "/v1/completions": '{"prompt": %s, "max_tokens": 2}',
        "/update-rounds": '{"prompts": [%s]}',
    }
    for route, template in bodies.items():
        assert_422(client.post(route, content=template.replace("%s", bad), headers=JSON))
    stop = '{"inputs": "Hi", "parameters": {"stop": [%s]}}'.replace("%s", bad)
    assert_422(client.post("/generate", content=stop, headers=JSON))


def test_round_prompts_are_limited_per_item(client: Any) -> None:
    r = client.post("/update-rounds", json={"prompts": ["x" * 20_000]})
    assert_422(r)
    assert "16384" in r.json()["error"]
    assert_422(client.post("/update-rounds", json={"prompts": ["hi"] * 513}))


# --------------------------------------------------------------------------- timestamps


def _aware_utc(value: str) -> None:
    ts = datetime.fromisoformat(value)
    assert ts.tzinfo is not None and ts.utcoffset() == timedelta(0), value


def test_sqlite_timestamps_carry_their_utc_offset(client: Any) -> None:
    r = client.post("/update-rounds", json={"num_prompts": 1})
    assert r.status_code == 202, r.text
    rid = r.json()["id"]
    _aware_utc(client.get(f"/update-rounds/{rid}").json()["created_at"])
    for item in client.get("/update-rounds").json()["items"]:
        _aware_utc(item["created_at"])
    cancelled = client.post(f"/update-rounds/{rid}/cancel").json()
    _aware_utc(cancelled["finished_at"])
    for item in client.get("/checkpoints").json()["items"]:
        _aware_utc(item["created_at"])
    for item in client.get("/metrics", headers={"accept": "application/json"}).json()["rounds"]:
        _aware_utc(item["created_at"])


# --------------------------------------------------------------------------- SSE JSON


def _strict(payload: str) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"bare {name} in SSE JSON: {payload}")

    return json.loads(payload, parse_constant=refuse)


def test_sse_json_never_carries_a_bare_nan() -> None:
    line = sse({"token": {"logprob": math.nan, "x": [math.inf, 1.5]}}).decode()
    assert _strict(line.removeprefix("data:").strip()) == {
        "token": {"logprob": None, "x": [None, 1.5]}
    }


def test_stream_with_extreme_allowed_parameters_is_valid_json(client: Any) -> None:
    body = {
        "inputs": "Hello Hello Hello",
        "parameters": {
            "max_new_tokens": 6,
            "do_sample": True,
            "temperature": 0.01,  # the smallest each accepts (app/protocol/common.py)
            "repetition_penalty": 0.01,
            "seed": 1,
        },
    }
    r = client.post("/generate_stream", json=body)
    assert r.status_code == 200, r.text
    events = [_strict(x.removeprefix("data:")) for x in r.text.split("\n\n") if x.strip()]
    assert events and events[-1]["generated_text"] is not None
    assert all(math.isfinite(e["token"]["logprob"]) for e in events)


# --------------------------------------------------------------------------- OpenAPI


def test_openapi_lists_the_real_error_responses(client: Any) -> None:
    doc = client.get("/openapi.json").json()
    text = json.dumps(doc)
    assert "HTTPValidationError" not in text  # FastAPI's 422 body, which we never send
    schemas = doc["components"]["schemas"]
    assert set(schemas["ErrorResponse"]["required"]) == {"error", "error_type"}

    def ref(op: dict[str, Any], code: int) -> str:
        r: str = op["responses"][str(code)]["content"]["application/json"]["schema"]["$ref"]
        return r.rsplit("/", 1)[-1]

    gen = doc["paths"]["/generate"]["post"]
    for code in (413, 422, 429, 500, 503, 504):
        assert ref(gen, code) == "ErrorResponse"
    assert "Retry-After" in gen["responses"]["429"]["headers"]
    completions = doc["paths"]["/v1/completions"]["post"]
    assert ref(completions, 400) == ref(completions, 404) == "OpenAIErrorResponse"
    assert "422" not in completions["responses"]  # /v1 answers an invalid request with 400
    assert "text/event-stream" in completions["responses"]["200"]["content"]
    assert set(doc["paths"]["/generate_stream"]["post"]["responses"]["200"]["content"]) == {
        "text/event-stream"
    }
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    one = doc["paths"]["/update-rounds/{round_id}"]["get"]
    assert ref(one, 404) == ref(one, 422) == "ErrorResponse"
    assert ref(doc["paths"]["/checkpoints/{version}/promote"]["post"], 409) == "ErrorResponse"
    assert ref(doc["paths"]["/health"]["get"], 503) == "HealthResponse"
    # What the documented 422 says is what a 422 is.
    r = client.post("/generate", json={"inputs": ""})
    assert set(r.json()) == set(schemas["ErrorResponse"]["properties"])
