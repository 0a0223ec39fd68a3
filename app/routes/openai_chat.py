"""POST /v1/chat/completions: messages rendered with the checkpoint's chat template."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.engine.interface import GenerationResult
from app.prometheus import observe_result
from app.protocol.openai import usage
from app.protocol.openai_chat import ChatCompletionRequest
from app.routes.openai_common import (
    cut_stop,
    finish_reason,
    kept_tokens,
    merged,
    new_id,
    safe_text,
    served_model,
    start_streams,
    token_bytes,
    top_ids,
)
from app.routes.stream import error_event_openai as error_event
from app.routes.stream import sse_openai as sse
from app.state import AppState, get_state
from core.modeling.params import TokenInfo

router = APIRouter(tags=["OpenAI"])


def _content_logprobs(tokens: list[TokenInfo], names: dict[int, str]) -> list[dict[str, Any]]:
    return [
        {
            "token": t.text,
            "logprob": t.logprob,
            "bytes": token_bytes(t.text),
            "top_logprobs": [
                {
                    "token": names.get(a.id, ""),
                    "logprob": a.logprob,
                    "bytes": token_bytes(names.get(a.id, "")),
                }
                for a in t.top
            ],
        }
        for t in tokens
    ]


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    req: ChatCompletionRequest,
    response: Response,
    state: Annotated[AppState, Depends(get_state)],
) -> dict[str, Any] | StreamingResponse:
    model = served_model(state, req.model)
    req.check_supported()
    prompt = await run_in_threadpool(state.engine.chat_prompt, req.rendered_messages())
    params = [req.to_sampling_params(state.settings, i) for i in range(req.n)]
    cid, created = new_id("chatcmpl")
    if req.stream:
        return await _stream(req, state, model, cid, created, prompt, params)
    results = await asyncio.gather(
        *(state.engine.generate(prompt, p, req.logprobs) for p in params)
    )
    choices = []
    for i, r in enumerate(results):
        observe_result(state, r)
        text, stopped = cut_stop(r.text, req.stops)
        logprobs = None
        if req.logprobs:
            kept = kept_tokens(r.tokens, text)
            names = await run_in_threadpool(state.engine.decode_tokens, top_ids(kept))
            logprobs = {"content": _content_logprobs(kept, names)}
        choices.append(
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish_reason(r, stopped),
            }
        )
    response.headers["x-model-version"] = str(results[0].model_version)
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(results[0].prompt_tokens, sum(r.generated_tokens for r in results)),
    }


async def _stream(
    req: ChatCompletionRequest,
    state: AppState,
    model: str,
    cid: str,
    created: int,
    prompt: str,
    params: list[Any],
) -> StreamingResponse:
    streams = await start_streams(state, prompt, params)
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    info = state.engine.info()

    def chunk(index: int, delta: dict[str, Any], finish: str | None, lp: Any = None) -> bytes:
        body: dict[str, Any] = {
            **base,
            "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}],
        }
        if req.include_usage:
            body["usage"] = None
        return sse(body)

    async def gen() -> AsyncIterator[bytes]:
        n = len(streams)
        raw, sent, done = [""] * n, [""] * n, [False] * n
        prompt_tokens = completion_tokens = 0
        names: dict[int, str] = {}
        try:
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""}, None)
            async for i, item in merged(streams):
                if isinstance(item, GenerationResult):
                    observe_result(state, item)
                    if not done[i]:
                        cut, stopped = cut_stop(item.text, req.stops)
                        rest = cut[len(sent[i]) :]
                        delta = {"content": rest} if rest else {}
                        yield chunk(i, delta, finish_reason(item, stopped))
                        done[i] = True
                    completion_tokens += item.generated_tokens
                    prompt_tokens = item.prompt_tokens
                    continue
                if done[i] or item.special:
                    continue
                raw[i] += item.text
                text, _ = safe_text(raw[i], req.stops)
                delta_text = text[len(sent[i]) :]
                sent[i] = text
                if not delta_text:
                    continue
                lp = None
                if req.logprobs:
                    missing = [a.id for a in item.top if a.id not in names]
                    if missing:
                        names.update(state.engine.decode_tokens(missing))
                    info_ = TokenInfo(item.id, item.text, item.logprob, item.special, item.top)
                    lp = {"content": _content_logprobs([info_], names)}
                yield chunk(i, {"content": delta_text}, None, lp)
            if req.include_usage:
                yield sse({**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
            yield sse("[DONE]")
        except Exception as e:
            yield error_event(e)

    headers = {"x-model-version": str(info.version)} if info else {}
    return StreamingResponse(gen(), media_type="text/event-stream", headers=headers)
