"""What the OpenAI routes share: the served model, stop handling, merged streams, logprobs."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from app.engine.interface import GenerationResult, StreamToken
from app.errors import ApiError
from app.state import AppState
from core.modeling.params import SamplingParams, TokenInfo

# huggingface_hub's InferenceClient sends a placeholder ("tgi", "dummy") for a URL; as TGI does,
# it is accepted as the served model).
ALIASES = frozenset({"tgi", "dummy"})


def served_model(state: AppState, requested: str | None) -> str:
    """The served model id; a request naming another model is a 404 (as OpenAI and vLLM)."""
    name = state.settings.model_name
    if requested is None or requested == name or requested in ALIASES:
        return name
    raise ApiError(
        404,
        f"The model `{requested}` does not exist. This server serves `{name}`.",
        param="model",
        code="model_not_found",
    )


def new_id(prefix: str) -> tuple[str, int]:
    return f"{prefix}-{uuid.uuid4().hex}", int(time.time())


def cut_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """OpenAI's text ends before the first stop sequence (TGI's keeps it)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def safe_text(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """What a stream may send so far: text before a stop sequence, holding back a tail that
    could still become one. Returns (text, stopped)."""
    cut, stopped = cut_stop(text, stops)
    if stopped:
        return cut, True
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return text[: len(text) - hold], False


def finish_reason(result: GenerationResult, stopped: bool) -> str:
    return "length" if result.finish_reason == "length" and not stopped else "stop"


def kept_tokens(tokens: list[TokenInfo], text: str) -> list[TokenInfo]:
    """The non-special tokens whose text starts inside `text` (after a stop cut)."""
    out: list[TokenInfo] = []
    offset = 0
    for t in tokens:
        if t.special:
            continue
        if offset >= len(text) and out:
            break
        out.append(t)
        offset += len(t.text)
    return out


async def merged(
    streams: list[AsyncIterator[StreamToken | GenerationResult]],
) -> AsyncIterator[tuple[int, StreamToken | GenerationResult]]:
    """Items of several engine streams as they come, tagged with the stream's index."""
    q: asyncio.Queue[tuple[int, StreamToken | GenerationResult | BaseException]] = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[StreamToken | GenerationResult]) -> None:
        try:
            async for item in s:
                await q.put((i, item))
        except BaseException as e:  # handed to the consumer, which raises it
            await q.put((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        finished = 0
        while finished < len(streams):
            i, item = await q.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, GenerationResult):
                finished += 1
            yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def start_streams(
    state: AppState, prompt: str, params: list[SamplingParams]
) -> list[AsyncIterator[StreamToken | GenerationResult]]:
    """Open one engine stream per choice and wait for its first item, so bad input is still a
    JSON error before the 200 goes out."""
    streams = [state.engine.stream(prompt, p) for p in params]
    firsts = await asyncio.gather(*(anext(s) for s in streams))
    return [_prepend(f, s) for f, s in zip(firsts, streams, strict=True)]


async def _prepend(
    first: StreamToken | GenerationResult, rest: AsyncIterator[StreamToken | GenerationResult]
) -> AsyncIterator[StreamToken | GenerationResult]:
    yield first
    async for item in rest:
        yield item


def token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def top_map(t: TokenInfo, names: dict[int, str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for a in t.top:
        out.setdefault(names.get(a.id, ""), a.logprob)
    return out


def top_ids(tokens: list[TokenInfo]) -> list[int]:
    return sorted({a.id for t in tokens for a in t.top})


def sse_usage(base: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
    return {**base, "choices": [], "usage": usage}
