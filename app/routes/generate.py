"""POST /generate (TGI's schema)."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from starlette.concurrency import run_in_threadpool

from app.errors import ApiError
from app.schemas import Details, GenerateParameters, GenerateRequest, GenerateResponse
from app.state import AppState, get_state
from core.db.models import ServedPrompt
from core.modeling.params import SamplingParams
from core.settings import Settings

log = logging.getLogger(__name__)
router = APIRouter()


def sampling_params(p: GenerateParameters, settings: Settings) -> SamplingParams:
    max_new = p.max_new_tokens if p.max_new_tokens is not None else settings.default_max_new_tokens
    if max_new <= 0:
        raise ApiError(422, "`max_new_tokens` must be strictly positive")
    if max_new > settings.max_new_tokens_limit:
        raise ApiError(
            422, f"`max_new_tokens` must be <= {settings.max_new_tokens_limit}. Given: {max_new}"
        )
    if len(p.stop) > settings.max_stop_sequences:
        raise ApiError(
            422,
            f"`stop` supports up to {settings.max_stop_sequences} stop sequences. "
            f"Given: {len(p.stop)}",
        )
    # As in TGI, any sampling warper turns sampling on even without do_sample.
    do_sample = (
        p.do_sample
        or (p.temperature is not None and p.temperature != 1.0)
        or p.top_k is not None
        or (p.top_p is not None and p.top_p < 1.0)
    )
    return SamplingParams(
        max_new_tokens=max_new,
        do_sample=do_sample,
        temperature=p.temperature if p.temperature is not None else 1.0,
        top_k=p.top_k,
        top_p=p.top_p,
        repetition_penalty=p.repetition_penalty,
        seed=p.seed,
        stop=tuple(p.stop),
        truncate=p.truncate,
    )


def _record_prompt(state: AppState, prompt: str, version: int) -> None:
    try:
        with state.db.session() as s:
            s.add(
                ServedPrompt(lineage=state.settings.lineage, prompt=prompt, model_version=version)
            )
    except Exception:  # recording is best effort: it must never fail a served request
        log.warning("could not record served prompt", exc_info=True)


# exclude_unset, not exclude_none: `details` is left out unless asked for, but a greedy
# request's `"seed": null` is part of TGI's details and must stay.
@router.post("/generate", response_model=GenerateResponse, response_model_exclude_unset=True)
async def generate(
    body: GenerateRequest, response: Response, state: Annotated[AppState, Depends(get_state)]
) -> GenerateResponse:
    params = sampling_params(body.parameters, state.settings)
    result = await state.engine.generate(body.inputs, params, body.parameters.details)
    response.headers["x-model-version"] = str(result.model_version)
    response.headers["x-generated-tokens"] = str(result.generated_tokens)
    response.headers["x-prompt-tokens"] = str(result.prompt_tokens)
    if state.settings.record_prompts:
        await run_in_threadpool(_record_prompt, state, body.inputs, result.model_version)
    text = body.inputs + result.text if body.parameters.return_full_text else result.text
    if not body.parameters.details:
        return GenerateResponse(generated_text=text)
    return GenerateResponse(
        generated_text=text,
        details=Details(
            finish_reason=result.finish_reason,
            generated_tokens=result.generated_tokens,
            seed=result.seed,
            prefill=[],
            tokens=[t.__dict__ for t in result.tokens],  # type: ignore[misc]
        ),
    )
