"""The bundled SmolLM2-135M-Instruct behind `selflm serve`, asked through the clients: the
chat template makes it answer a factual question sensibly (the text matters here)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow
_spec = importlib.util.spec_from_file_location(
    "client_libraries", Path(__file__).with_name("test_client_libraries.py")
)
assert _spec is not None and _spec.loader is not None
helpers: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

MODEL = "bundled:smollm2-135m-instruct"
QUESTION: Any = [
    {"role": "system", "content": "You are a helpful assistant. Answer in one sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("smollm2")
    url, proc, _ = helpers.start_server(
        root, {"SELFLM_BASE_MODEL": MODEL, "SELFLM_TORCH_THREADS": "2"}
    )
    try:
        yield url
    finally:
        helpers.stop_server(proc)


@pytest.mark.compat("openai", "chat.completions.create on SmolLM2: answers 'Paris'")
def test_openai_chat_answers_paris(server: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    assert "Paris" in (r.choices[0].message.content or ""), r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.compat("huggingface_hub", "chat_completion(stream=True) on SmolLM2: 'Paris'")
def test_hf_chat_stream_answers_paris(server: str) -> None:
    from huggingface_hub import InferenceClient

    hf = InferenceClient(model=server)
    text = "".join(
        c.choices[0].delta.content or ""
        for c in hf.chat_completion(QUESTION, max_tokens=24, temperature=0, stream=True)
        if c.choices
    )
    assert "Paris" in text, text
    # The chat ends at the template's end-of-turn token, not by running out of tokens.
    out = hf.chat_completion(QUESTION, max_tokens=64, temperature=0)
    assert out.choices[0].finish_reason == "stop" and "<|im_end|>" not in text
