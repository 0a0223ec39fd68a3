"""The client libraries our users already have, unchanged, against a real `selflm serve`.

One server process per module (tiny:llama, API keys on, so every client also proves it can
authenticate): the official `openai` client, `huggingface_hub.InferenceClient` pointed at the
server's root URL, LangChain's `OpenAI` and `ChatOpenAI`, and a Prometheus scrape parsed by
`prometheus_client`. Each test's `compat` mark is a row of docs/compatibility.md
(scripts/compatibility.py runs this module and writes the table).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

KEY = "sk-test-key"
MODEL = "tiny:llama"
SCRAPE_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
compat = pytest.mark.compat


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(root: Path, extra: dict[str, str]) -> tuple[str, subprocess.Popen[bytes], Path]:
    """`python -m selflm.cli serve` on a free port; returns once /health answers 200."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFLM_")}
    env.update(
        SELFLM_DATABASE_URL=f"sqlite:///{root / 'selflm.db'}",
        SELFLM_CHECKPOINT_DIR=str(root / "checkpoints"),
        SELFLM_BASE_MODEL=MODEL,
        SELFLM_EMBEDDED_WORKER="false",
        SELFLM_DEVICE="cpu",
        SELFLM_DTYPE="float32",
        SELFLM_TORCH_THREADS="1",
    )
    env.update(extra)
    log = root / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "selflm.cli", "serve", "--port", str(port)],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=root,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return url, proc, log
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"server not healthy:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("clients")
    url, proc, _ = start_server(root, {"SELFLM_API_KEYS": KEY})
    try:
        yield url
    finally:
        stop_server(proc)


def greedy(server: str, prompt: str, n: int) -> str:
    r = httpx.post(
        server + "/generate",
        json={"inputs": prompt, "parameters": {"max_new_tokens": n}},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    text: str = r.json()["generated_text"]
    return text


# --------------------------------------------------------------------------- openai


@pytest.fixture(scope="module")
def oai(server: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


@compat("openai", "models.list(), models.retrieve(id)")
def test_openai_models(oai: Any) -> None:
    models = oai.models.list()
    assert [m.id for m in models.data] == [MODEL]
    card = oai.models.retrieve(MODEL)
    assert card.id == MODEL and card.model_extra["version"] == 1


@compat("openai", "completions.create (prompt list, n, echo, logprobs, penalties)")
def test_openai_completions(oai: Any, server: str) -> None:
    r = oai.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0)
    assert r.choices[0].text == greedy(server, "Hello", 6)
    assert r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 0
    many = oai.completions.create(
        model=MODEL,
        prompt=["Hello", "Goodbye"],
        max_tokens=4,
        n=2,
        temperature=0.8,
        seed=1,
        frequency_penalty=0,
        presence_penalty=0.5,
    )
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    echoed = oai.completions.create(
        model=MODEL, prompt="Hello there", max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    choice = echoed.choices[0]
    assert choice.text.startswith("Hello there")
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert all(len(t) >= 1 for t in lp.top_logprobs[1:])


@compat("openai", "completions.create(stream=True, stream_options.include_usage)")
def test_openai_completions_stream(oai: Any, server: str) -> None:
    chunks = list(
        oai.completions.create(
            model=MODEL,
            prompt="Hello",
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == greedy(server, "Hello", 6)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 6


@compat("openai", "chat.completions.create (system/user/assistant, n, seed, logprobs)")
def test_openai_chat(oai: Any) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again?"},
    ]
    r = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage.completion_tokens <= 5 and r.usage.total_tokens > r.usage.prompt_tokens
    capped = oai.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=2, temperature=0
    )
    assert capped.usage.completion_tokens <= 2 and capped.choices[0].finish_reason == "length"
    seeded = [
        oai.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=4, n=2, seed=9, temperature=0.9
        )
        for _ in range(2)
    ]
    assert [c.message.content for c in seeded[0].choices] == [
        c.message.content for c in seeded[1].choices
    ]
    lp = oai.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = lp.choices[0].logprobs.content
    assert "".join(t.token for t in content) == lp.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


@compat("openai", "chat.completions.create(stream=True, stream_options.include_usage)")
def test_openai_chat_stream(oai: Any) -> None:
    messages = [{"role": "user", "content": "Tell me a story"}]
    whole = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    chunks = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@compat("openai", "typed errors (BadRequestError, NotFoundError, AuthenticationError)")
def test_openai_typed_errors(oai: Any, server: str) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as bad:
        oai.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=5)
    assert "temperature" in str(bad.value)
    assert bad.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as missing:
        oai.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert "gpt-4" in str(missing.value)
    with pytest.raises(openai.BadRequestError) as tools:
        oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert "tools" in str(tools.value)
    wrong = openai.OpenAI(base_url=server + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        wrong.models.list()
    assert "invalid API key" in str(auth.value)


# --------------------------------------------------------------------------- huggingface_hub


@pytest.fixture(scope="module")
def hf(server: str) -> Any:
    from huggingface_hub import InferenceClient

    return InferenceClient(model=server, token=KEY)


@compat("huggingface_hub", "InferenceClient(url).text_generation (POST /)")
def test_hf_text_generation(hf: Any, server: str) -> None:
    assert hf.text_generation("Hello", max_new_tokens=6) == greedy(server, "Hello", 6)


@compat("huggingface_hub", "text_generation(details=True, top_n_tokens, decoder_input_details)")
def test_hf_text_generation_details(hf: Any) -> None:
    out = hf.text_generation(
        "Hello world",
        max_new_tokens=5,
        details=True,
        decoder_input_details=True,
        top_n_tokens=2,
    )
    d = out.details
    assert d.generated_tokens == len(d.tokens) and d.finish_reason in ("length", "eos_token")
    assert "".join(t.text for t in d.tokens if not t.special) == out.generated_text
    assert d.prefill[0].logprob is None and len(d.prefill) >= 2
    assert len(d.top_tokens) == len(d.tokens) and all(len(t) == 2 for t in d.top_tokens)
    best = hf.text_generation(
        "Hello", max_new_tokens=4, details=True, best_of=2, do_sample=True, seed=1
    )
    assert len(best.details.best_of_sequences) == 1


@compat("huggingface_hub", "text_generation(stream=True), with and without details")
def test_hf_text_generation_stream(hf: Any, server: str) -> None:
    expected = greedy(server, "Hello", 6)
    assert "".join(hf.text_generation("Hello", max_new_tokens=6, stream=True)) == expected
    events = list(hf.text_generation("Hello", max_new_tokens=6, stream=True, details=True))
    assert all(e.token is not None for e in events)
    assert events[-1].generated_text == expected
    assert events[-1].details.generated_tokens == len(events)


@compat("huggingface_hub", "chat_completion, plain and stream=True")
def test_hf_chat_completion(hf: Any) -> None:
    messages = [{"role": "user", "content": "Hi there"}]
    out = hf.chat_completion(messages, max_tokens=6, temperature=0)
    text = out.choices[0].message.content
    assert text and out.usage.completion_tokens <= 6
    pieces = [
        c.choices[0].delta.content or ""
        for c in hf.chat_completion(messages, max_tokens=6, temperature=0, stream=True)
        if c.choices
    ]
    assert "".join(pieces) == text


# --------------------------------------------------------------------------- LangChain


@compat("langchain-openai", "OpenAI(...).invoke / .stream")
def test_langchain_openai(server: str) -> None:
    from langchain_openai import OpenAI

    llm = OpenAI(
        base_url=server + "/v1", api_key=SecretStr(KEY), model=MODEL, max_tokens=6, temperature=0
    )
    expected = greedy(server, "Hello", 6)
    assert llm.invoke("Hello") == expected
    assert "".join(llm.stream("Hello")) == expected


@compat("langchain-openai", "ChatOpenAI(...).invoke / .stream")
def test_langchain_chat_openai(server: str) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        base_url=server + "/v1",
        api_key=SecretStr(KEY),
        model=MODEL,
        max_completion_tokens=6,
        temperature=0,
    )
    msg = chat.invoke([("system", "Be brief."), ("human", "Hi")])
    assert isinstance(msg.content, str) and msg.content
    streamed = "".join(
        str(c.content) for c in chat.stream([("system", "Be brief."), ("human", "Hi")])
    )
    assert streamed == msg.content


# --------------------------------------------------------------------------- Prometheus


@compat("prometheus", "scrape with Prometheus' Accept header (OpenMetrics), text/plain 0.0.4")
def test_prometheus_scrape(server: str) -> None:
    from prometheus_client.openmetrics.parser import (
        text_string_to_metric_families as parse_openmetrics,
    )
    from prometheus_client.parser import text_string_to_metric_families as parse_text

    auth = {"Authorization": f"Bearer {KEY}"}
    greedy(server, "count me", 3)
    r = httpx.get(server + "/metrics", headers={"Accept": SCRAPE_ACCEPT, **auth}, timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    families = {f.name: f for f in parse_openmetrics(r.text)}  # type: ignore[no-untyped-call]
    for name in (
        "selflm_request_count",
        "selflm_e2e_request_latency_seconds",
        "selflm_time_to_first_token_seconds",
        "selflm_request_queue_time_seconds",
        "selflm_time_per_output_token_seconds",
        "selflm_request_prompt_tokens",
        "selflm_request_generation_tokens",
        "selflm_batch_size",
        "selflm_num_requests_running",
        "selflm_num_requests_waiting",
        "selflm_serving_version",
        "selflm_swaps",
        "selflm_refused_swaps",
        "selflm_rounds",
        "selflm_round_stage_seconds",
        "selflm_champion_perplexity",
    ):
        assert name in families, name
    counts = {
        s.labels["route"]: s.value
        for s in families["selflm_request_count"].samples
        if s.name == "selflm_request_count_total"
    }
    assert counts["/generate"] >= 1
    e2e = {s.name: s.value for s in families["selflm_e2e_request_latency_seconds"].samples}
    assert e2e["selflm_e2e_request_latency_seconds_count"] >= 1
    assert families["selflm_serving_version"].samples[0].value == 1
    plain = httpx.get(
        server + "/metrics", headers={"Accept": "text/plain;version=0.0.4", **auth}, timeout=30
    )
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
    names = {f.name for f in parse_text(plain.text)}
    assert "selflm_time_to_first_token_seconds" in names
    as_json = httpx.get(server + "/metrics", headers={"Accept": "application/json", **auth})
    assert as_json.json()["champion_version"] == 1
    assert httpx.get(server + "/metrics", headers={"Accept": SCRAPE_ACCEPT}).status_code == 401
