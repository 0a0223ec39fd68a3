"""/generate_stream (TGI SSE) and /v1/completions (OpenAI) on the tiny model."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient


def events(body: str) -> list[Any]:
    out = []
    for block in body.strip().split("\n\n"):
        assert block.startswith("data:"), block
        payload = block.removeprefix("data:").strip()
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_stream_matches_generate(client: TestClient) -> None:
    req = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 12}}
    whole = client.post("/generate", json=req).json()["generated_text"]
    r = client.post("/generate_stream", json=req)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-model-version"] == "1"
    evs = events(r.text)
    # As TGI's: every event carries a real token, the last one with the text and details.
    tokens = [e["token"] for e in evs]
    assert all(t is not None for t in tokens)
    assert all(e["generated_text"] is None and e["details"] is None for e in evs[:-1])
    assert "".join(t["text"] for t in tokens if not t["special"]) == whole
    assert [e["index"] for e in evs] == list(range(1, len(evs) + 1))
    last = evs[-1]
    assert last["generated_text"] == whole
    assert last["details"]["generated_tokens"] == len(tokens)
    assert last["details"]["finish_reason"] in ("length", "eos_token")
    assert last["details"]["input_length"] > 0


def test_stream_bad_input_is_json_422(client: TestClient) -> None:
    r = client.post("/generate_stream", json={"inputs": "", "parameters": {}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    r = client.post(
        "/generate_stream", json={"inputs": "x " * 600, "parameters": {"max_new_tokens": 10}}
    )
    assert r.status_code == 422 and r.json()["error_type"] == "validation"


def test_completions(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and len(body["choices"]) == 1
    greedy = client.post(
        "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 6}}
    ).json()
    assert body["choices"][0]["text"] == greedy["generated_text"]
    assert body["usage"]["completion_tokens"] <= 6
    r = client.post(
        "/v1/completions",
        json={"prompt": "Hello", "max_tokens": 5, "n": 3, "seed": 7, "temperature": 0.9},
    )
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    again = client.post(
        "/v1/completions",
        json={"prompt": "Hello", "max_tokens": 5, "n": 3, "seed": 7, "temperature": 0.9},
    ).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in choices]


def test_completions_stop_is_excluded_and_stream_works(client: TestClient) -> None:
    base = client.post(
        "/v1/completions", json={"prompt": "Hello", "max_tokens": 10, "temperature": 0}
    ).json()["choices"][0]["text"]
    stop = base.split()[1] if len(base.split()) > 1 else base.strip()[:2]
    cut = client.post(
        "/v1/completions",
        json={"prompt": "Hello", "max_tokens": 10, "temperature": 0, "stop": stop},
    ).json()
    assert stop not in cut["choices"][0]["text"]
    assert cut["choices"][0]["finish_reason"] == "stop"
    r = client.post(
        "/v1/completions",
        json={"prompt": "Hello", "max_tokens": 10, "temperature": 0, "stream": True},
    )
    evs = events(r.text)
    assert evs[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in evs[:-1]) == base
    for bad, param in (
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "temperature": 3}, "temperature"),
        ({"prompt": "x", "temperature": float("nan")}, "temperature"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias"),
        ({"prompt": [1, 2, 3]}, "prompt"),
    ):
        r = client.post(
            "/v1/completions",
            content=json.dumps(bad),  # NaN as bare JSON, as a careless client sends it
            headers={"content-type": "application/json"},
        )
        # OpenAI's envelope and status: the reason reaches the client.
        assert r.status_code == 400, (bad, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param, (bad, err)
        assert param in err["message"]
    # Fields of newer API versions are ignored, as vLLM does.
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "store": False})
    assert r.status_code == 200
