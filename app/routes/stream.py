"""POST /generate_stream: TGI's Server-Sent Events token stream."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from app.engine.interface import EngineDeadlineError, GenerationResult
from app.routes.generate import sampling_params
from app.schemas import GenerateRequest
from app.state import AppState, get_state

router = APIRouter()


def _finite(data: Any) -> Any:
    """NaN and infinities have no JSON spelling (json.dumps writes a bare NaN): null."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_finite(v) for v in data]
    return data


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(_finite(data), allow_nan=False)
    return f"data:{payload}\n\n".encode()


@router.post("/generate_stream")
async def generate_stream(
    body: GenerateRequest, state: Annotated[AppState, Depends(get_state)]
) -> StreamingResponse:
    params = sampling_params(body.parameters, state.settings)
    # Validate (and queue) before the 200 goes out, so bad input is still a JSON 422.
    events = state.engine.stream(body.inputs, params)
    first = await anext(events)
    info = state.engine.info()

    async def gen() -> AsyncIterator[bytes]:
        item: Any = first
        index = 0
        while True:
            if isinstance(item, GenerationResult):
                text = (
                    item.text if not body.parameters.return_full_text else body.inputs + item.text
                )
                yield sse(
                    {
                        "index": index,
                        "token": None,
                        "generated_text": text,
                        "details": {
                            "finish_reason": item.finish_reason,
                            "generated_tokens": item.generated_tokens,
                            "seed": item.seed,
                        },
                    }
                )
                return
            index += 1
            yield sse(
                {
                    "index": index,
                    "token": {
                        "id": item.id,
                        "text": item.text,
                        "logprob": item.logprob,
                        "special": item.special,
                    },
                    "generated_text": None,
                    "details": None,
                }
            )
            try:
                item = await anext(events)
            except Exception as e:  # after the 200, TGI reports an error as an event
                kind = "timeout" if isinstance(e, EngineDeadlineError) else "generation"
                yield sse({"error": str(e), "error_type": kind})
                return

    headers = {"x-model-version": str(info.version)} if info else {}
    return StreamingResponse(gen(), media_type="text/event-stream", headers=headers)
