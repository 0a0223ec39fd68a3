"""POST /generate, /health and /info through the real app, on a tiny random llama.

The `client` fixture (tests/conftest.py) starts the app once for this module: migrations,
base-checkpoint import, the batching engine — no part is replaced.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

MAX_CONTEXT = 512  # tiny:<arch> models have 512 positions
PROMPT = "def main():\n    return"


def gen(client: Any, inputs: Any, **parameters: Any) -> Any:
    return client.post("/generate", json={"inputs": inputs, "parameters": parameters})


def ok(client: Any, inputs: str, **parameters: Any) -> dict[str, Any]:
    r = gen(client, inputs, **parameters)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def engine(client: Any) -> Any:
    return client.app.state.selflm.engine


def concurrently(fn: Any, items: list[Any]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=len(items)) as ex:
        return list(ex.map(fn, items))


def stop_candidate(full: dict[str, Any]) -> str:
    """A stop string guaranteed to occur early in `full`'s generated text."""
    text = full["generated_text"]
    tokens: list[str] = [t["text"] for t in full["details"]["tokens"]]
    for i in range(2, len(tokens) // 2):
        stop = tokens[i] + tokens[i + 1]
        if stop.strip() and stop.isprintable() and stop in text:
            return stop
    raise AssertionError(f"no usable stop string in {text!r}")


# --------------------------------------------------------------------------- greedy


def test_greedy_is_deterministic(client: Any) -> None:
    a = ok(client, PROMPT, max_new_tokens=16)
    b = ok(client, PROMPT, max_new_tokens=16)
    c = ok(client, PROMPT, max_new_tokens=16, do_sample=False)
    assert a["generated_text"], "a greedy run should produce text"
    assert a["generated_text"] == b["generated_text"] == c["generated_text"]
    assert "details" not in a  # details only when asked for


def test_concurrent_greedy_requests_are_identical(client: Any) -> None:
    solo = ok(client, PROMPT, max_new_tokens=16, do_sample=False)["generated_text"]
    before = engine(client).batches
    texts = concurrently(
        lambda _: ok(client, PROMPT, max_new_tokens=16, do_sample=False)["generated_text"],
        list(range(6)),
    )
    assert texts == [solo] * 6
    assert engine(client).batches - before < 6, "six concurrent requests were not batched"


def test_batched_prompts_of_different_lengths_match_solo(client: Any) -> None:
    # Left padding with an attention mask must not change a row's output.
    prompts = ["The quick brown fox", "Once upon a time there was a king who", "Hi", PROMPT]
    solo = {p: ok(client, p, max_new_tokens=12)["generated_text"] for p in prompts}
    batched = concurrently(lambda p: ok(client, p, max_new_tokens=12)["generated_text"], prompts)
    assert dict(zip(prompts, batched, strict=True)) == solo


# --------------------------------------------------------------------------- sampling


def test_seeded_sample_is_reproducible(client: Any) -> None:
    params = {"max_new_tokens": 16, "do_sample": True, "seed": 1234, "details": True}
    a = ok(client, PROMPT, **params)
    b = ok(client, PROMPT, **params)
    other = ok(client, PROMPT, **{**params, "seed": 4321})
    greedy = ok(client, PROMPT, max_new_tokens=16)
    assert a["generated_text"] == b["generated_text"]
    assert a["details"]["seed"] == 1234
    # 16 draws from a near-uniform 49k-token distribution: a collision is not a thing.
    assert other["generated_text"] != a["generated_text"]
    assert a["generated_text"] != greedy["generated_text"]


def test_unseeded_sample_reports_a_seed_that_reproduces_it(client: Any) -> None:
    first = ok(client, PROMPT, max_new_tokens=12, do_sample=True, details=True)
    seed = first["details"]["seed"]
    assert isinstance(seed, int)
    again = ok(client, PROMPT, max_new_tokens=12, do_sample=True, seed=seed, details=True)
    assert again["generated_text"] == first["generated_text"]
    assert again["details"]["seed"] == seed


def test_seeded_sample_is_the_same_inside_a_batch(client: Any) -> None:
    params = {"max_new_tokens": 12, "do_sample": True, "seed": 77}
    solo = ok(client, PROMPT, **params)["generated_text"]
    mixed = [
        params,
        {"max_new_tokens": 12},
        {**params, "seed": 78},
        params,
        {"max_new_tokens": 5, "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9},
    ]
    out = concurrently(lambda p: ok(client, PROMPT, **p)["generated_text"], mixed)
    assert out[0] == solo and out[3] == solo
    assert out[2] != solo


# --------------------------------------------------------------------------- details, limits


def test_details_fields(client: Any) -> None:
    r = gen(client, PROMPT, max_new_tokens=7, details=True)
    assert r.status_code == 200, r.text
    d = r.json()["details"]
    assert d["finish_reason"] == "length"
    assert d["generated_tokens"] == 7
    assert d["seed"] is None  # greedy: no seed, as in TGI
    assert len(d["tokens"]) == 7
    assert all(isinstance(t["logprob"], float) and t["logprob"] <= 0 for t in d["tokens"])
    assert r.headers["x-generated-tokens"] == "7"
    assert int(r.headers["x-prompt-tokens"]) > 0


@pytest.mark.parametrize("n", [1, 5, 20])
def test_max_new_tokens_is_respected(client: Any, n: int) -> None:
    body = ok(client, PROMPT, max_new_tokens=n, details=True)
    assert body["details"]["generated_tokens"] == n
    assert body["details"]["finish_reason"] == "length"


def test_default_max_new_tokens_is_bounded(client: Any) -> None:
    body = ok(client, "Hi", details=True)
    settings = client.app.state.selflm.settings
    assert 0 < body["details"]["generated_tokens"] <= settings.default_max_new_tokens


def test_return_full_text_prepends_prompt(client: Any) -> None:
    plain = ok(client, PROMPT, max_new_tokens=8)["generated_text"]
    full = ok(client, PROMPT, max_new_tokens=8, return_full_text=True)["generated_text"]
    assert full == PROMPT + plain
    assert plain and not plain.startswith(PROMPT)


# --------------------------------------------------------------------------- stop sequences


@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "seed": 5}], ids=["greedy", "seed"])
def test_stop_sequence_cuts_text(client: Any, sampling: dict[str, Any]) -> None:
    full = ok(client, PROMPT, max_new_tokens=24, details=True, **sampling)
    text = full["generated_text"]
    stop = stop_candidate(full)
    expected = text[: text.find(stop) + len(stop)]
    assert len(expected) < len(text)

    cut = ok(client, PROMPT, max_new_tokens=24, details=True, stop=[stop], **sampling)
    assert cut["generated_text"] == expected
    assert cut["generated_text"].endswith(stop)
    assert len(cut["generated_text"]) < len(text)
    assert cut["details"]["finish_reason"] == "stop_sequence"
    assert cut["details"]["generated_tokens"] < full["details"]["generated_tokens"]

    # Several stops: one that never occurs does not disturb the one that does.
    two = ok(client, PROMPT, max_new_tokens=24, details=True, stop=["\x01never", stop], **sampling)
    assert two["generated_text"] == expected
    assert two["details"]["finish_reason"] == "stop_sequence"


def test_stop_sequence_that_never_occurs(client: Any) -> None:
    body = ok(client, PROMPT, max_new_tokens=6, details=True, stop=["\x01never"])
    assert body["details"]["finish_reason"] == "length"
    assert body["generated_text"] == ok(client, PROMPT, max_new_tokens=6)["generated_text"]


# --------------------------------------------------------------------------- headers


def test_model_version_header_everywhere(client: Any) -> None:
    responses = {
        "generate": gen(client, "Hi", max_new_tokens=2),
        "health": client.get("/health"),
        "info": client.get("/info"),
        "validation": gen(client, "", max_new_tokens=2),
        "not_found": client.get("/no-such-route"),
        "method": client.get("/generate"),
    }
    for name, r in responses.items():
        assert r.headers.get("x-model-version") == "1", (name, r.status_code, r.headers)


# --------------------------------------------------------------------------- validation


LONG_PROMPT = " hello" * 300  # ~300 tokens: with 300 new tokens, over the 512 context

INVALID: dict[str, tuple[Any, str | None]] = {
    # name: (request body, a word the message must mention — None where any text will do)
    "empty inputs": ({"inputs": ""}, "inputs"),
    "whitespace inputs": ({"inputs": "  \n\t "}, "inputs"),
    "int inputs": ({"inputs": 42}, "inputs"),
    "list inputs": ({"inputs": ["a", "b"]}, "inputs"),
    "null inputs": ({"inputs": None}, "inputs"),
    "missing inputs": ({"parameters": {"max_new_tokens": 2}}, "inputs"),
    "max_new_tokens 0": ({"inputs": "Hi", "parameters": {"max_new_tokens": 0}}, "max_new_tokens"),
    "max_new_tokens negative": (
        {"inputs": "Hi", "parameters": {"max_new_tokens": -3}},
        "max_new_tokens",
    ),
    "max_new_tokens over limit": (
        {"inputs": "Hi", "parameters": {"max_new_tokens": 1025}},
        "max_new_tokens",
    ),
    "max_new_tokens not int": (
        {"inputs": "Hi", "parameters": {"max_new_tokens": "many"}},
        "max_new_tokens",
    ),
    "temperature 0": (
        {"inputs": "Hi", "parameters": {"do_sample": True, "temperature": 0}},
        "temperature",
    ),
    "temperature negative": (
        {"inputs": "Hi", "parameters": {"do_sample": True, "temperature": -0.5}},
        "temperature",
    ),
    "top_p 0": ({"inputs": "Hi", "parameters": {"do_sample": True, "top_p": 0}}, "top_p"),
    "top_p 1.5": ({"inputs": "Hi", "parameters": {"do_sample": True, "top_p": 1.5}}, "top_p"),
    "top_k 0": ({"inputs": "Hi", "parameters": {"do_sample": True, "top_k": 0}}, "top_k"),
    "new tokens over context": (
        {"inputs": "Hi", "parameters": {"max_new_tokens": 600}},
        "max_new_tokens",
    ),
    "prompt + new tokens over context": (
        {"inputs": LONG_PROMPT, "parameters": {"max_new_tokens": 300}},
        "max_new_tokens",
    ),
    "too many stop sequences": (
        {"inputs": "Hi", "parameters": {"stop": ["a", "b", "c", "d", "e"]}},
        "stop",
    ),
    "empty stop sequence": ({"inputs": "Hi", "parameters": {"stop": [""]}}, "stop"),
    "unknown top-level field": ({"inputs": "Hi", "bogus": 1}, "bogus"),
    "unknown parameter": ({"inputs": "Hi", "parameters": {"max_tokens": 5}}, "max_tokens"),
    "negative seed": ({"inputs": "Hi", "parameters": {"do_sample": True, "seed": -1}}, "seed"),
    "parameters not object": ({"inputs": "Hi", "parameters": [1]}, "parameters"),
    "body not object": (["Hi"], None),
}


def _assert_validation(r: Any, mention: str | None) -> None:
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"}, body
    assert body["error_type"] == "validation"
    assert isinstance(body["error"], str) and body["error"].strip()
    if mention is not None:
        assert mention in body["error"], body


@pytest.mark.parametrize("name", list(INVALID))
def test_validation_errors(client: Any, name: str) -> None:
    body, mention = INVALID[name]
    served = engine(client).requests
    r = client.post("/generate", json=body)
    _assert_validation(r, mention)
    assert engine(client).requests == served, "an invalid request reached the model"


@pytest.mark.parametrize(
    "raw",
    ['{"inputs": "Hi", ', "not json at all", '{"inputs": "Hi"} trailing', ""],
    ids=["truncated", "text", "trailing", "empty"],
)
def test_malformed_json_is_422(client: Any, raw: str) -> None:
    r = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    _assert_validation(r, None)


def test_context_limit_boundary(client: Any) -> None:
    # Find the prompt's token count, then ask for exactly the context and one more.
    prompt = " hello" * 500
    probe = gen(client, prompt, max_new_tokens=1)
    assert probe.status_code == 200, probe.text
    n_prompt = int(probe.headers["x-prompt-tokens"])
    room = MAX_CONTEXT - n_prompt
    assert 1 <= room < 20, n_prompt

    fits = ok(client, prompt, max_new_tokens=room, details=True)
    assert fits["details"]["generated_tokens"] <= room
    _assert_validation(gen(client, prompt, max_new_tokens=room + 1), "max_new_tokens")


def test_sampling_warpers_accept_valid_edges(client: Any) -> None:
    ok(client, "Hi", max_new_tokens=2, do_sample=True, top_p=1.0, temperature=0.01, seed=1)
    ok(client, "Hi", max_new_tokens=2, top_k=1, repetition_penalty=1.3)


# --------------------------------------------------------------------------- other routes


def test_unknown_route_is_json_404(client: Any) -> None:
    r = client.get("/definitely/not/here")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["error_type"] == "not_found" and body["error"]


def test_wrong_method_is_json_405(client: Any) -> None:
    r = client.get("/generate")
    assert r.status_code == 405
    assert r.json()["error_type"] == "method_not_allowed"


def test_health(client: Any) -> None:
    r = client.get("/health")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok"
    assert body["model_loaded"] is True
    assert body["database"] is True
    assert body["serving_version"] == 1


def test_info(client: Any) -> None:
    r = client.get("/info")
    assert r.status_code == 200, r.text
    info = r.json()
    settings = client.app.state.selflm.settings
    assert info["model_id"] == "tiny:llama"
    assert info["model_version"] == 1
    assert info["model_dtype"] == "float32"
    assert info["model_device_type"] == "cpu"
    assert info["max_total_tokens"] == MAX_CONTEXT
    assert info["max_input_tokens"] == MAX_CONTEXT - 1
    assert info["max_new_tokens"] == settings.max_new_tokens_limit == 1024
    assert info["max_stop_sequences"] == settings.max_stop_sequences == 4
    assert info["max_batch_size"] == settings.max_batch_size
    assert info["lineage"] == "default"
    assert isinstance(info["version"], str) and info["version"]
    json.dumps(info)  # plain JSON all the way down


# --------------------------------------------------------------------------- batching


def test_concurrent_requests_are_batched(client: Any) -> None:
    prompts = [f"Request number {i} says" for i in range(8)]
    eng = engine(client)
    batches, served = eng.batches, eng.requests
    bodies = concurrently(lambda p: ok(client, p, max_new_tokens=16, details=True), prompts)
    assert all(b["details"]["generated_tokens"] == 16 for b in bodies)
    assert eng.requests - served == 8
    ran = eng.batches - batches
    assert 1 <= ran < 8, f"8 concurrent requests took {ran} batches: not batched"


# --------------------------------------------------------------------------- TGI's full surface

# What huggingface_hub's InferenceClient would send with every parameter left at its default.
ALL_NULL = {
    "adapter_id": None,
    "best_of": None,
    "decoder_input_details": False,
    "details": None,
    "do_sample": False,
    "frequency_penalty": None,
    "grammar": None,
    "max_new_tokens": 5,
    "repetition_penalty": None,
    "return_full_text": None,
    "seed": None,
    "stop": None,
    "temperature": None,
    "top_k": None,
    "top_n_tokens": None,
    "top_p": None,
    "truncate": None,
    "typical_p": None,
    "watermark": False,
}


def test_every_tgi_parameter_accepts_its_default(client: Any) -> None:
    plain = ok(client, PROMPT, max_new_tokens=5)
    for route in ("/generate", "/"):
        body = {"inputs": PROMPT, "parameters": {**ALL_NULL, "details": False}}
        r = client.post(route, json=body)
        assert r.status_code == 200, (route, r.text)
        assert r.json()["generated_text"] == plain["generated_text"]


def test_root_route_streams_when_asked(client: Any) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 6}, "stream": True}
    r = client.post("/", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    blocks = [json.loads(b.removeprefix("data:")) for b in r.text.strip().split("\n\n")]
    assert blocks[-1]["token"] is not None
    assert blocks[-1]["generated_text"] == ok(client, PROMPT, max_new_tokens=6)["generated_text"]
    # /generate itself takes no `stream` (TGI's /generate does not either).
    assert client.post("/generate", json=body).status_code == 422


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"grammar": {"type": "regex", "value": "a+"}}, "grammar"),
        ({"watermark": True}, "watermark"),
        ({"adapter_id": "lora-1"}, "adapter_id"),
        ({"best_of": 2}, "best_of"),  # greedy
        ({"best_of": 3, "do_sample": True}, "best_of"),  # over max_best_of (2)
        ({"temperature": 1e-50}, "temperature"),
        ({"repetition_penalty": 1e-320}, "repetition_penalty"),
        ({"top_n_tokens": 6}, "top_n_tokens"),
        ({"typical_p": 0}, "typical_p"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
    ],
)
def test_values_that_cannot_be_honored_are_named(
    client: Any, parameters: dict[str, Any], field: str
) -> None:
    r = gen(client, PROMPT, max_new_tokens=2, **parameters)
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation" and field in r.json()["error"]


def test_non_finite_numbers_are_422(client: Any) -> None:
    for field in ("temperature", "top_p", "repetition_penalty", "typical_p"):
        raw = json.dumps({"inputs": "hi", "parameters": {field: float("nan")}})  # bare NaN
        r = client.post("/generate", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422 and field in r.json()["error"], (field, r.text)


def test_stream_refuses_what_it_cannot_stream(client: Any) -> None:
    for parameters, field in (
        ({"decoder_input_details": True}, "decoder_input_details"),
        ({"best_of": 2, "do_sample": True}, "best_of"),
    ):
        r = client.post("/generate_stream", json={"inputs": PROMPT, "parameters": parameters})
        assert r.status_code == 422 and field in r.json()["error"]


def test_tokens_add_up_to_generated_text(client: Any) -> None:
    for sampling in ({}, {"do_sample": True, "seed": 3}):
        body = ok(client, "Once upon a time", max_new_tokens=20, details=True, **sampling)
        tokens = body["details"]["tokens"]
        assert body["details"]["generated_tokens"] == len(tokens)
        text = "".join(t["text"] for t in tokens if not t["special"])
        assert text == body["generated_text"]


def test_top_n_tokens(client: Any) -> None:
    body = ok(client, PROMPT, max_new_tokens=6, details=True, top_n_tokens=3)
    tokens, tops = body["details"]["tokens"], body["details"]["top_tokens"]
    assert len(tops) == len(tokens)
    for tok, top in zip(tokens, tops, strict=True):
        assert len(top) == 3
        lps = [t["logprob"] for t in top]
        assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
        assert top[0]["id"] == tok["id"]  # greedy picks the most likely token
        assert abs(top[0]["logprob"] - tok["logprob"]) < 1e-4
    assert "top_tokens" not in ok(client, PROMPT, max_new_tokens=2, details=True)["details"]


def test_decoder_input_details_gives_prompt_logprobs(client: Any) -> None:
    body = ok(client, PROMPT, max_new_tokens=2, details=True, decoder_input_details=True)
    prefill = body["details"]["prefill"]
    ids = [t["id"] for t in client.post("/tokenize", json={"inputs": PROMPT}).json()]
    assert [t["id"] for t in prefill] == ids
    assert prefill[0]["logprob"] is None
    assert all(t["logprob"] <= 0 for t in prefill[1:])
    assert "".join(t["text"] for t in prefill) == PROMPT
    assert ok(client, PROMPT, max_new_tokens=2, details=True)["details"]["prefill"] == []


def test_tokenize_offsets(client: Any) -> None:
    r = client.post("/tokenize", json={"inputs": PROMPT})
    assert r.status_code == 200
    toks = r.json()
    assert toks and all(PROMPT[t["start"] : t["stop"]] == t["text"] for t in toks)
    assert "".join(t["text"] for t in toks) == PROMPT


def test_typical_p_samples_reproducibly(client: Any) -> None:
    a = ok(client, PROMPT, max_new_tokens=8, typical_p=0.5, seed=11)
    b = ok(client, PROMPT, max_new_tokens=8, typical_p=0.5, seed=11)
    assert a["generated_text"] == b["generated_text"]


def test_frequency_penalty_reduces_repetition(client: Any) -> None:
    # The tiny random model repeats itself when greedy; the penalty must break that.
    plain = ok(client, "The quick brown fox", max_new_tokens=16, details=True)
    pen = ok(client, "The quick brown fox", max_new_tokens=16, details=True, frequency_penalty=2.0)
    distinct = [len({t["id"] for t in b["details"]["tokens"]}) for b in (plain, pen)]
    assert distinct[1] > distinct[0]


def test_best_of_returns_the_most_likely_sample(client: Any) -> None:
    body = ok(client, PROMPT, max_new_tokens=6, details=True, best_of=2, do_sample=True, seed=5)
    others = body["details"]["best_of_sequences"]
    assert len(others) == 1
    best = sum(t["logprob"] for t in body["details"]["tokens"])
    assert best >= sum(t["logprob"] for t in others[0]["tokens"])
    again = ok(client, PROMPT, max_new_tokens=6, details=True, best_of=2, do_sample=True, seed=5)
    assert again["generated_text"] == body["generated_text"]


def test_eos_is_reported_as_tgi_reports_it(tmp_path: Any, make_tiny_settings: Any) -> None:
    """A model that always says EOS: the EOS token is in details.tokens (special, counted in
    generated_tokens, absent from generated_text) and is the stream's last token event."""
    import asyncio
    from datetime import UTC, datetime

    import torch

    from app.engine.interface import GenerationResult, ModelInfo
    from app.engine.torch_engine import LoadedModel, TorchEngine
    from core.modeling.loader import tiny_model
    from core.modeling.params import SamplingParams

    base = tiny_model("llama")
    model, tok = base.model, base.tokenizer
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 50.0
    model.lm_head = head
    model.eval()
    eng = TorchEngine(make_tiny_settings(tmp_path))
    info = ModelInfo(1, "eos", "float32", "cpu", 512, datetime.now(UTC), 0)
    eng.swap(LoadedModel(model=model, tokenizer=tok, info=info))
    try:
        params = SamplingParams(max_new_tokens=5)
        result = asyncio.run(eng.generate("Hello", params, details=True))
        assert result.finish_reason == "eos_token" and result.text == ""
        assert result.generated_tokens == 1
        [eos] = result.tokens
        assert eos.id == tok.eos_token_id and eos.special and eos.text == tok.eos_token

        async def collect() -> list[Any]:
            return [item async for item in eng.stream("Hello", params)]

        items = asyncio.run(collect())
        assert isinstance(items[-1], GenerationResult)
        assert [t.id for t in items[:-1]] == [tok.eos_token_id] and items[0].special
    finally:
        eng.close()
