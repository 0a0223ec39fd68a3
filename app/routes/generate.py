"""TGI's routes without streaming: POST /generate, POST / (TGI's alias), POST /tokenize."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.engine.interface import GenerationResult
from app.prometheus import observe_result
from app.protocol.tgi import (
    BestOfSequence,
    CompatGenerateRequest,
    Details,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    PrefillToken,
    SimpleToken,
    Token,
    TokenizeRequest,
)
from app.routes.stream import stream_tgi
from app.state import AppState, get_state
from core.db.models import ServedPrompt
from core.modeling.params import TokenInfo

log = logging.getLogger(__name__)
router = APIRouter(tags=["TGI"])


def _record_prompt(state: AppState, prompt: str, version: int) -> None:
    try:
        with state.db.session() as s:
            s.add(
                ServedPrompt(lineage=state.settings.lineage, prompt=prompt, model_version=version)
            )
    except Exception:  # recording is best effort: it must never fail a served request
        log.warning("could not record served prompt", exc_info=True)


def _tokens(infos: list[TokenInfo]) -> list[Token]:
    return [Token(id=t.id, text=t.text, logprob=t.logprob, special=t.special) for t in infos]


def _top_tokens(infos: list[TokenInfo], decode: dict[int, str]) -> list[list[Token]]:
    return [
        [Token(id=a.id, text=decode.get(a.id, ""), logprob=a.logprob, special=False) for a in t.top]
        for t in infos
    ]


def _score(r: GenerationResult) -> float:
    return sum(t.logprob for t in r.tokens)


async def serve_generate(
    body: GenerateRequest, state: AppState, response: Response
) -> GenerateResponse:
    p: GenerateParameters = body.parameters
    p.check_supported(state.settings, stream=False)
    best_of = p.best_of or 1
    params = [p.to_sampling_params(state.settings, i) for i in range(best_of)]
    want = p.details or p.decoder_input_details or best_of > 1
    results = await asyncio.gather(*(state.engine.generate(body.inputs, sp, want) for sp in params))
    order = sorted(range(best_of), key=lambda i: -_score(results[i])) if best_of > 1 else [0]
    result = results[order[0]]
    response.headers["x-model-version"] = str(result.model_version)
    response.headers["x-generated-tokens"] = str(result.generated_tokens)
    response.headers["x-prompt-tokens"] = str(result.prompt_tokens)
    for r in results:
        observe_result(state, r)
    if state.settings.record_prompts:
        await run_in_threadpool(_record_prompt, state, body.inputs, result.model_version)
    prefix = body.inputs if p.return_full_text else ""
    if not (p.details or p.decoder_input_details):
        return GenerateResponse(generated_text=prefix + result.text)
    prefill: list[PrefillToken] = []
    if p.decoder_input_details:
        prompt = await run_in_threadpool(state.engine.prompt_details, body.inputs, params[0])
        prefill = [
            PrefillToken(id=t.id, text=t.text, logprob=None if math.isnan(t.logprob) else t.logprob)
            for t in prompt.tokens
        ]
    names = await run_in_threadpool(_top_names, state, results) if p.top_n_tokens else {}
    details = Details(
        finish_reason=result.finish_reason,
        generated_tokens=result.generated_tokens,
        seed=result.seed,
        prefill=prefill,
        tokens=_tokens(result.tokens),
    )
    if p.top_n_tokens:
        details.top_tokens = _top_tokens(result.tokens, names)
    if best_of > 1:
        details.best_of_sequences = [
            BestOfSequence(
                generated_text=prefix + results[i].text,
                finish_reason=results[i].finish_reason,
                generated_tokens=results[i].generated_tokens,
                seed=results[i].seed,
                prefill=prefill,
                tokens=_tokens(results[i].tokens),
                top_tokens=_top_tokens(results[i].tokens, names),
            )
            for i in order[1:]
        ]
    return GenerateResponse(generated_text=prefix + result.text, details=details)


def _top_names(state: AppState, results: list[GenerationResult]) -> dict[int, str]:
    ids = {a.id for r in results for t in r.tokens for a in t.top}
    return state.engine.decode_tokens(sorted(ids))


# exclude_unset: `details` is left out unless asked for, and so are `top_tokens` and
# `best_of_sequences`, while a greedy request's `"seed": null` stays (TGI sends it).
@router.post("/generate", response_model=GenerateResponse, response_model_exclude_unset=True)
async def generate(
    body: GenerateRequest, response: Response, state: Annotated[AppState, Depends(get_state)]
) -> GenerateResponse:
    return await serve_generate(body, state, response)


@router.post(
    "/",
    response_model=GenerateResponse,
    response_model_exclude_unset=True,
    summary="TGI's compatibility route: /generate, or /generate_stream with stream=true",
)
async def compat_generate(
    body: CompatGenerateRequest,
    response: Response,
    state: Annotated[AppState, Depends(get_state)],
) -> GenerateResponse | StreamingResponse:
    if body.stream:
        return await stream_tgi(body, state)
    return await serve_generate(body, state, response)


@router.post("/tokenize", response_model=list[SimpleToken])
async def tokenize(
    body: TokenizeRequest, state: Annotated[AppState, Depends(get_state)]
) -> list[SimpleToken]:
    pieces = await run_in_threadpool(state.engine.tokenize, body.inputs)
    if body.parameters is not None and body.parameters.truncate is not None:
        pieces = pieces[-body.parameters.truncate :]
    return [SimpleToken(id=i, text=t, start=a, stop=b) for i, t, a, b in pieces]
