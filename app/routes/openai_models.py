"""GET /v1/models and GET /v1/models/{id}: the served model under its constant name."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from app.errors import ApiError
from app.protocol.openai import ModelCard, ModelList
from app.routes.openai_common import served_model
from app.state import AppState, get_state

router = APIRouter(tags=["OpenAI"])


def _card(state: AppState) -> ModelCard:
    info = state.engine.info()
    if info is None:
        raise ApiError(503, "no model loaded yet")
    return ModelCard(
        id=state.settings.model_name,
        created=int(info.loaded_at.timestamp()),
        root=info.model_id,
        version=info.version,
        lineage=state.settings.lineage,
        max_model_len=info.max_context,
    )


@router.get("/v1/models", response_model=ModelList)
async def list_models(state: Annotated[AppState, Depends(get_state)]) -> ModelList:
    return ModelList(data=[_card(state)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, state: Annotated[AppState, Depends(get_state)]) -> ModelCard:
    if model_id != state.settings.model_name:
        served_model(state, model_id)  # raises the 404 in OpenAI's envelope
    return _card(state)
