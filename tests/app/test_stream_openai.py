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


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]


def test_chat_uses_the_template_and_cuts_stops(client: TestClient) -> None:
    body = {"messages": CHAT, "max_tokens": 8, "temperature": 0}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["x-model-version"] == "1"
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == "tiny:llama"
    # The template wraps the turns in <|im_start|>role ... <|im_end|>: more than the words.
    raw = client.post("/tokenize", json={"inputs": "Be brief. Hello"}).json()
    assert out["usage"]["prompt_tokens"] > len(raw) + 6
    text = out["choices"][0]["message"]["content"]
    # Same prompt through /generate with the rendered template gives the same text.
    rendered = client.app.state.selflm.engine.chat_prompt(CHAT)  # type: ignore[attr-defined]
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert rendered.endswith("<|im_start|>assistant\n")
    greedy = client.post(
        "/generate", json={"inputs": rendered, "parameters": {"max_new_tokens": 8}}
    ).json()
    assert text == greedy["generated_text"]
    if len(text.split()) > 1:
        stop = text.split()[1]
        cut = client.post("/v1/chat/completions", json={**body, "stop": [stop]}).json()
        assert stop not in cut["choices"][0]["message"]["content"]
        assert cut["choices"][0]["finish_reason"] == "stop"


def test_chat_stream_with_n_and_usage(client: TestClient) -> None:
    body = {
        "messages": CHAT,
        "max_tokens": 5,
        "n": 2,
        "seed": 3,
        "temperature": 0.9,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = client.post("/v1/chat/completions", json=body)
    evs = events(r.text)
    assert evs[-1] == "[DONE]"
    chunks = [e for e in evs[:-1] if e["choices"]]
    texts = ["", ""]
    finishes = [None, None]
    for c in chunks:
        ch = c["choices"][0]
        texts[ch["index"]] += ch["delta"].get("content", "")
        finishes[ch["index"]] = ch["finish_reason"] or finishes[ch["index"]]
        assert c["usage"] is None
    assert all(f in ("stop", "length") for f in finishes)
    whole = client.post("/v1/chat/completions", json={**body, "stream": False}).json()
    assert texts == [c["message"]["content"] for c in whole["choices"]]
    assert evs[-2]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]


def test_openai_tiny_temperature_is_greedy(client: TestClient) -> None:
    a = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "temperature": 0})
    b = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "temperature": 1e-50})
    assert b.status_code == 200
    assert a.json()["choices"][0]["text"] == b.json()["choices"][0]["text"]


def test_models_and_openai_errors(client: TestClient) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny:llama"
    card = client.get("/v1/models/tiny:llama").json()
    assert card["version"] == 1 and card["object"] == "model"
    r = client.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = client.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = client.post("/v1/nope", json={})
    assert r.status_code == 404 and "message" in r.json()["error"]
    r = client.post(
        "/v1/chat/completions",
        json={"messages": CHAT, "response_format": {"type": "json_object"}},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    long = {"prompt": "x " * 600, "max_tokens": 5}
    r = client.post("/v1/completions", json=long)
    assert r.status_code == 400 and "max_new_tokens" in r.json()["error"]["message"]
