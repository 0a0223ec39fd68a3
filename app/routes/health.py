"""GET /health and GET /info."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from app.errors import ApiError
from app.routes.info import lineage_summary
from app.schemas import HealthResponse, InfoResponse
from app.state import AppState, get_state
from core import __version__

router = APIRouter()


@router.get("/health", response_model=HealthResponse)
async def health(state: Annotated[AppState, Depends(get_state)]) -> JSONResponse:
    engine = state.engine.health()
    db_ok = await run_in_threadpool(state.db.ping)
    watcher = state.extras.get("watcher")
    swap = watcher.status() if watcher is not None else {}
    loaded = bool(engine.get("model_loaded"))
    status: Literal["ok", "degraded", "unavailable"] = (
        "ok" if loaded and db_ok else ("degraded" if loaded else "unavailable")
    )
    if status == "ok" and swap.get("error"):
        status = "degraded"
    body = HealthResponse(
        status=status,
        model_loaded=loaded,
        database=db_ok,
        serving_version=engine.get("serving_version"),
        wanted_version=swap.get("wanted_version"),
        swap_error=swap.get("error"),
        details={**engine, **{k: v for k, v in swap.items() if k not in ("error",)}},
    )
    # A replica that cannot serve is not ready: load balancers and compose read the code.
    code = 200 if loaded and db_ok else 503
    return JSONResponse(body.model_dump(), status_code=code)


@router.get("/info", response_model=InfoResponse)
async def info(state: Annotated[AppState, Depends(get_state)]) -> InfoResponse:
    m = state.engine.info()
    if m is None:
        raise ApiError(503, "no model loaded yet")
    s = state.settings
    try:
        lineage = await run_in_threadpool(lineage_summary, state)
    except SQLAlchemyError:  # /info answers without its database too
        lineage = {"champion_version": None, "lineage_versions": []}
    return InfoResponse(
        model_id=m.model_id,
        model_version=m.version,
        model_dtype=m.dtype,
        model_device_type=m.device,
        loaded_at=m.loaded_at.isoformat(),
        max_input_tokens=m.max_context - 1,
        max_total_tokens=m.max_context,
        max_new_tokens=s.max_new_tokens_limit,
        max_stop_sequences=s.max_stop_sequences,
        max_batch_size=s.max_batch_size,
        lineage=s.lineage,
        version=__version__,
        champion_version=lineage["champion_version"],
        lineage_versions=lineage["lineage_versions"],
    )
