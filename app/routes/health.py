"""GET /health (liveness), /health/live, /health/ready (readiness) and GET /info."""

from __future__ import annotations

from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from app.errors import ApiError
from app.routes.info import lineage_summary
from app.schemas import HealthResponse, InfoResponse
from app.state import AppState, get_state
from core import __version__
from core.db.liveness import live_workers

router = APIRouter()


# A health probe's database check gets this long; its threads are its own (never the pool
# the routes use), so a partition cannot starve anything through /health.
PROBE_TIMEOUT_S = 2.0
_probe_limiter: anyio.CapacityLimiter | None = None


def _check_db(state: AppState) -> tuple[bool, int | None]:
    if not state.db.ping():
        return False, None
    workers = live_workers(state.db, state.settings.worker_stale_after_s, role="celery")
    return True, len(workers)


async def _probe(state: AppState) -> tuple[bool, int | None]:
    """(database reachable, live Celery workers) within PROBE_TIMEOUT_S; (False, None) else."""
    global _probe_limiter
    if _probe_limiter is None:
        _probe_limiter = anyio.CapacityLimiter(4)
    with anyio.move_on_after(PROBE_TIMEOUT_S):
        try:
            return await anyio.to_thread.run_sync(
                _check_db, state, limiter=_probe_limiter, abandon_on_cancel=True
            )
        except Exception:
            return False, None
    return False, None


def _report(request: Request, state: AppState, db_ok: bool, live: int | None) -> HealthResponse:
    engine = state.engine.health()
    watcher = state.extras.get("watcher")
    swap = watcher.status() if watcher is not None else {}
    loaded = bool(engine.get("model_loaded"))
    supervisor = getattr(request.app.state, "worker_supervisor", None)
    embedded = supervisor.status() if supervisor is not None else None
    fallback = state.extras.get("fallback")
    reaper = state.extras.get("reaper")
    workers = {"alive": live, "embedded": embedded}
    worker_ok = embedded is None or bool(embedded.get("alive"))
    problems = not db_ok or not worker_ok or bool(swap.get("error")) or fallback is not None
    status: Literal["ok", "degraded", "unavailable"] = (
        "unavailable" if not loaded else ("degraded" if problems else "ok")
    )
    return HealthResponse(
        status=status,
        model_loaded=loaded,
        database=db_ok,
        serving_version=engine.get("serving_version"),
        wanted_version=swap.get("wanted_version"),
        swap_error=swap.get("error"),
        details={
            **engine,
            **{k: v for k, v in swap.items() if k not in ("error",)},
            "workers": workers,
            "fallback": fallback,
            "reaper_error": getattr(reaper, "last_error", None),
        },
    )


@router.get(
    "/health",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "no model loaded"}},
)
async def health(request: Request, state: Annotated[AppState, Depends(get_state)]) -> JSONResponse:
    """Liveness (what Docker's healthcheck reads): 200 while a model is loaded and serving,
    even with the database or the worker down (then `status` is "degraded" and the body says
    which); 503 only when nothing can be served. Readiness is /health/ready."""
    db_ok, live = await _probe(state)
    body = _report(request, state, db_ok, live)
    return JSONResponse(body.model_dump(), status_code=200 if body.model_loaded else 503)


@router.get("/health/live", responses={503: {"description": "no model loaded"}})
async def live(state: Annotated[AppState, Depends(get_state)]) -> JSONResponse:
    """Process up and a model loaded; no database access at all."""
    loaded = bool(state.engine.health().get("model_loaded"))
    return JSONResponse({"status": "ok" if loaded else "unavailable"}, 200 if loaded else 503)


@router.get(
    "/health/ready",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "not ready"}},
)
async def ready(request: Request, state: Annotated[AppState, Depends(get_state)]) -> JSONResponse:
    """Readiness: a model loaded, the database reachable and, when this process supervises an
    embedded worker, that worker alive. 503 otherwise (take the replica out of rotation)."""
    db_ok, live = await _probe(state)
    body = _report(request, state, db_ok, live)
    embedded = body.details["workers"]["embedded"]
    ok = body.model_loaded and db_ok and (embedded is None or bool(embedded.get("alive")))
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


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
