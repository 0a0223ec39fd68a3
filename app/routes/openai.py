"""POST /v1/completions: the OpenAI completions API over the same engine."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import StreamingResponse
from pydantic import Field, field_validator

from app.engine.interface import GenerationResult
from app.errors import ApiError
from app.routes.stream import sse
from app.schemas import Strict
from app.state import AppState, get_state
from core.modeling.params import SamplingParams

router = APIRouter()


class CompletionRequest(Strict):
    model: str | None = None
    prompt: str
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    stream: bool = False
    user: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("`prompt` cannot be empty")
        return v


def _cut_stop(text: str, stops: tuple[str, ...]) -> str:
    # OpenAI's text excludes the stop sequence (TGI's keeps it).
    for s in stops:
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    return text


def _params(req: CompletionRequest, state: AppState, i: int) -> SamplingParams:
    s = state.settings
    if req.max_tokens > s.max_new_tokens_limit:
        raise ApiError(422, f"`max_tokens` must be <= {s.max_new_tokens_limit}")
    stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stops) > s.max_stop_sequences or any(not x for x in stops):
        raise ApiError(422, f"`stop` takes up to {s.max_stop_sequences} non-empty sequences")
    sample = req.temperature > 0  # OpenAI: temperature 0 is greedy
    return SamplingParams(
        max_new_tokens=req.max_tokens,
        do_sample=sample,
        temperature=req.temperature if sample else 1.0,
        top_p=req.top_p if req.top_p < 1 else None,
        seed=(req.seed + i) if req.seed is not None and sample else None,
        stop=stops,
    )


def _finish(r: GenerationResult) -> str:
    return "length" if r.finish_reason == "length" else "stop"


@router.post("/v1/completions", response_model=None)
async def completions(
    req: CompletionRequest, response: Response, state: Annotated[AppState, Depends(get_state)]
) -> dict[str, Any] | StreamingResponse:
    info = state.engine.info()
    model = req.model or (info.model_id if info else "selflm")
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    params = [_params(req, state, i) for i in range(req.n)]
    if req.stream:
        if req.n != 1:
            raise ApiError(422, "`stream` supports n=1 only")
        events = state.engine.stream(req.prompt, params[0])
        first = await anext(events)

        async def gen() -> AsyncIterator[bytes]:
            item: Any = first
            sent = ""
            while True:
                if isinstance(item, GenerationResult):
                    final = _cut_stop(item.text, params[0].stop)
                    yield sse(_chunk(cid, created, model, final[len(sent) :], _finish(item)))
                    yield sse("[DONE]")
                    return
                # Hold back text that may turn into a stop sequence.
                pending = _cut_stop(sent + item.text, params[0].stop)
                delta, sent = pending[len(sent) :], pending
                if delta:
                    yield sse(_chunk(cid, created, model, delta, None))
                item = await anext(events)

        headers = {"x-model-version": str(info.version)} if info else {}
        return StreamingResponse(gen(), media_type="text/event-stream", headers=headers)
    results = await asyncio.gather(*(state.engine.generate(req.prompt, p) for p in params))
    response.headers["x-model-version"] = str(results[0].model_version)
    completion = sum(r.generated_tokens for r in results)
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "text": _cut_stop(r.text, params[i].stop),
                "logprobs": None,
                "finish_reason": _finish(r),
            }
            for i, r in enumerate(results)
        ],
        "usage": {
            "prompt_tokens": results[0].prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": results[0].prompt_tokens + completion,
        },
    }


def _chunk(cid: str, created: int, model: str, text: str, finish: str | None) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }
