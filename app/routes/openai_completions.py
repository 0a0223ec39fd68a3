"""POST /v1/completions: OpenAI's completions over the same engine."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.engine.interface import GenerationResult
from app.prometheus import observe_result
from app.protocol.openai import usage
from app.protocol.openai_completions import CompletionRequest
from app.routes.openai_common import (
    cut_stop,
    finish_reason,
    kept_tokens,
    merged,
    new_id,
    safe_text,
    served_model,
    start_streams,
    top_ids,
    top_map,
)
from app.routes.stream import error_event_openai as error_event
from app.routes.stream import sse_openai as sse
from app.state import AppState, get_state
from core.modeling.params import TokenInfo

router = APIRouter(tags=["OpenAI"])


def _score(r: GenerationResult) -> float:
    return sum(t.logprob for t in r.tokens)


def _logprobs(
    tokens: list[TokenInfo], names: dict[int, str], start: int, first_is_prompt: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {k: [] for k in ("tokens", "token_logprobs", "top_logprobs")}
    out["text_offset"] = []
    offset = start
    for k, t in enumerate(tokens):
        lp = None if (first_is_prompt and k == 0) or math.isnan(t.logprob) else t.logprob
        out["tokens"].append(t.text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(top_map(t, names) if lp is not None else None)
        out["text_offset"].append(offset)
        offset += len(t.text)
    return out


async def _choice(
    req: CompletionRequest,
    state: AppState,
    prompt: str,
    result: GenerationResult,
    index: int,
    echo_tokens: list[TokenInfo],
) -> dict[str, Any]:
    text, stopped = cut_stop(result.text, req.stops)
    prefix = prompt if req.echo else ""
    logprobs = None
    if req.logprobs is not None:
        kept = kept_tokens(result.tokens, text)
        names = await run_in_threadpool(
            state.engine.decode_tokens, top_ids(kept) + top_ids(echo_tokens)
        )
        logprobs = _logprobs(echo_tokens + kept, names, 0, bool(echo_tokens))
    return {
        "index": index,
        "text": prefix + text,
        "logprobs": logprobs,
        "finish_reason": finish_reason(result, stopped),
    }


@router.post("/v1/completions", response_model=None)
async def completions(
    req: CompletionRequest, response: Response, state: Annotated[AppState, Depends(get_state)]
) -> dict[str, Any] | StreamingResponse:
    model = served_model(state, req.model)
    req.check_supported()
    cid, created = new_id("cmpl")
    want = req.logprobs is not None or req.candidates > req.n
    params = [req.to_sampling_params(state.settings, i) for i in range(req.candidates)]
    if req.stream:
        return await _stream(req, state, model, cid, created, params)
    choices: list[dict[str, Any]] = []
    prompt_tokens = completion_tokens = 0
    version = 0
    for p_index, prompt in enumerate(req.prompts):
        results = list(
            await asyncio.gather(*(state.engine.generate(prompt, p, want) for p in params))
        )
        for r in results:
            observe_result(state, r)
        if req.candidates > req.n:  # best_of: the n most likely of best_of
            results = sorted(results, key=_score, reverse=True)[: req.n]
        echo: list[TokenInfo] = []
        if req.echo and req.logprobs is not None:
            details = await run_in_threadpool(state.engine.prompt_details, prompt, params[0])
            echo = details.tokens
        for i, r in enumerate(results):
            choice = await _choice(req, state, prompt, r, p_index * req.n + i, echo)
            choices.append(choice)
        prompt_tokens += results[0].prompt_tokens
        completion_tokens += sum(r.generated_tokens for r in results)
        version = results[0].model_version
    response.headers["x-model-version"] = str(version)
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


async def _stream(
    req: CompletionRequest,
    state: AppState,
    model: str,
    cid: str,
    created: int,
    params: list[Any],
) -> StreamingResponse:
    prompts = req.prompts
    # One engine stream per (prompt, choice); choice index = prompt index * n + i.
    streams = []
    for prompt in prompts:
        streams += await start_streams(state, prompt, params)
    base = {"id": cid, "object": "text_completion", "created": created, "model": model}
    info = state.engine.info()

    def chunk(index: int, text: str, finish: str | None, lp: Any = None) -> bytes:
        body: dict[str, Any] = {
            **base,
            "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}],
        }
        if req.include_usage:
            body["usage"] = None
        return sse(body)

    async def gen() -> AsyncIterator[bytes]:
        raw = [""] * len(streams)
        sent = [""] * len(streams)
        done = [False] * len(streams)
        prompt_tokens = completion_tokens = 0
        try:
            if req.echo:
                for i in range(len(streams)):
                    yield chunk(i, prompts[i // req.n], None)
            async for i, item in merged(streams):
                if isinstance(item, GenerationResult):
                    observe_result(state, item)
                    if not done[i]:
                        cut, stopped = cut_stop(item.text, req.stops)
                        yield chunk(i, cut[len(sent[i]) :], finish_reason(item, stopped))
                        done[i] = True
                    completion_tokens += item.generated_tokens
                    if i % req.n == 0:
                        prompt_tokens += item.prompt_tokens
                    continue
                if done[i] or item.special:
                    continue
                raw[i] += item.text
                text, stopped = safe_text(raw[i], req.stops)
                delta = text[len(sent[i]) :]
                sent[i] = text
                lp = None
                if req.logprobs is not None and delta:
                    lp = {
                        "tokens": [item.text],
                        "token_logprobs": [item.logprob],
                        "top_logprobs": [{}],
                        "text_offset": [len(sent[i]) - len(delta)],
                    }
                if delta:
                    yield chunk(i, delta, None, lp)
            if req.include_usage:
                yield sse({**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
            yield sse("[DONE]")
        except Exception as e:
            yield error_event(e)

    headers = {"x-model-version": str(info.version)} if info else {}
    return StreamingResponse(gen(), media_type="text/event-stream", headers=headers)
