"""POST /generate_stream: TGI's Server-Sent Events token stream.

As TGI's, the last event carries a real token (the last generated one, or the EOS token)
together with `generated_text` and `details`; an error after the 200 is an error event.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from app.engine.interface import EngineDeadlineError, GenerationResult, StreamToken
from app.prometheus import observe_result
from app.protocol.tgi import GenerateRequest
from app.state import AppState, get_state

log = logging.getLogger(__name__)
router = APIRouter(tags=["TGI"])


def _finite(value: Any) -> Any:
    """JSON without bare NaN/Infinity (invalid JSON that clients choke on): null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def sse(data: dict[str, Any] | str, sep: str = "") -> bytes:
    """One Server-Sent Event. TGI writes `data:{...}`; OpenAI `data: {...}` (pass sep=" "):
    huggingface_hub matches OpenAI's `data: [DONE]` byte for byte."""
    payload = data if isinstance(data, str) else json.dumps(_finite(data), allow_nan=False)
    return f"data:{sep}{payload}\n\n".encode()


def sse_openai(data: dict[str, Any] | str) -> bytes:
    return sse(data, " ")


def error_event(exc: BaseException) -> bytes:
    log.warning("stream failed after the response started: %s", exc)
    kind = "validation" if isinstance(exc, ValueError) else "generation"
    if isinstance(exc, EngineDeadlineError):
        kind = "timeout"
    return sse({"error": str(exc) or type(exc).__name__, "error_type": kind})


def error_event_openai(exc: BaseException) -> bytes:
    log.warning("stream failed after the response started: %s", exc)
    kind = "invalid_request_error" if isinstance(exc, ValueError) else "server_error"
    return sse_openai(
        {
            "error": {
                "message": str(exc) or type(exc).__name__,
                "type": kind,
                "param": None,
                "code": None,
            }
        }
    )


def _token(t: StreamToken) -> dict[str, Any]:
    return {"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special}


async def stream_tgi(body: GenerateRequest, state: AppState) -> StreamingResponse:
    p = body.parameters
    p.check_supported(state.settings, stream=True)
    params = p.to_sampling_params(state.settings)
    # Validate (and queue) before the 200 goes out, so bad input is still a JSON 422.
    events = state.engine.stream(body.inputs, params)
    first = await anext(events)
    info = state.engine.info()
    names: dict[int, str] = {}

    def event(index: int, tok: StreamToken, end: GenerationResult | None) -> bytes:
        out: dict[str, Any] = {"index": index, "token": _token(tok)}
        if tok.top:
            missing = [a.id for a in tok.top if a.id not in names]
            if missing:
                names.update(state.engine.decode_tokens(missing))
            out["top_tokens"] = [
                {"id": a.id, "text": names[a.id], "logprob": a.logprob, "special": False}
                for a in tok.top
            ]
        out["generated_text"] = None
        out["details"] = None
        if end is not None:
            prefix = body.inputs if p.return_full_text else ""
            out["generated_text"] = prefix + end.text
            out["details"] = {
                "finish_reason": end.finish_reason,
                "generated_tokens": end.generated_tokens,
                "seed": end.seed,
                "input_length": end.prompt_tokens,
            }
        return sse(out)

    async def gen() -> AsyncIterator[bytes]:
        item: StreamToken | GenerationResult = first
        held: StreamToken | None = None  # one token behind: the last goes out with the end
        index = 0
        try:
            while True:
                if isinstance(item, GenerationResult):
                    observe_result(state, item)
                    if held is not None:
                        yield event(index, held, item)
                    return
                if held is not None:
                    yield event(index, held, None)
                index += 1
                held = item
                item = await anext(events)
        except Exception as e:  # after the 200: TGI's error event, not a cut connection
            yield error_event(e)

    headers = {"x-model-version": str(info.version)} if info else {}
    return StreamingResponse(gen(), media_type="text/event-stream", headers=headers)


@router.post("/generate_stream")
async def generate_stream(
    body: GenerateRequest, state: Annotated[AppState, Depends(get_state)]
) -> StreamingResponse:
    return await stream_tgi(body, state)
