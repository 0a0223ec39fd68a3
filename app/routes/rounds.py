"""Self-update rounds: POST/GET /update-rounds, GET /update-rounds/{id}, cancel."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from app.auth import require_api_key
from app.errors import ApiError
from app.schemas import DB_INT_MAX
from app.state import AppState, get_state
from core.db import rounds as records
from core.db.models import UpdateRound
from core.queue import enqueue_round, make_client
from core.round_params import RoundParams

log = logging.getLogger(__name__)
router = APIRouter()


class RoundOut(BaseModel):
    id: int
    lineage: str
    status: str
    stage: str | None
    progress: float
    params: dict[str, Any]
    base_version: int | None
    candidate_version: int | None
    decision: str | None
    reason: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    worker_id: str | None
    attempts: int
    timings: dict[str, float]
    metrics: dict[str, dict[str, Any]]


class RoundList(BaseModel):
    items: list[RoundOut]
    total: int
    limit: int
    offset: int


def round_out(row: UpdateRound) -> RoundOut:
    metrics = records.metrics_dict(row)
    timings = {
        stage: float(values["seconds"])
        for stage, values in metrics.items()
        if isinstance(values.get("seconds"), float)
    }
    return RoundOut(
        id=row.id,
        lineage=row.lineage,
        status=row.status,
        stage=row.stage,
        progress=row.progress,
        params=row.params,
        base_version=row.base_version,
        candidate_version=row.candidate_version,
        decision=row.decision,
        reason=row.reason,
        error=row.error,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        heartbeat_at=row.heartbeat_at,
        worker_id=row.worker_id,
        attempts=row.attempts,
        timings=timings,
        metrics=metrics,
    )


def _start(state: AppState, params: RoundParams) -> UpdateRound:
    s = state.settings
    records.expire_stale(state.db, s.lineage, s.round_stale_after_s)
    row = records.create_round(state.db, s.lineage, params.model_dump())
    client = state.extras.get("celery")
    if client is None:
        client = state.extras["celery"] = make_client(s)
    try:
        enqueue_round(client, row.id)
    except Exception as e:
        records.finish(state.db, row.id, "failed", error=f"could not enqueue: {e}")
        raise ApiError(503, f"broker unavailable: {e}") from e
    return row


@router.post(
    "/update-rounds",
    status_code=202,
    response_model=RoundOut,
    dependencies=[Depends(require_api_key)],
)
async def start_round(
    response: Response,
    state: Annotated[AppState, Depends(get_state)],
    params: Annotated[RoundParams | None, Body()] = None,
) -> RoundOut:
    try:
        row = await run_in_threadpool(_start, state, params or RoundParams())
    except records.RoundConflictError as e:
        raise ApiError(
            409,
            f"{e}; poll /update-rounds/{e.active_id}",
            "conflict",
            {"Location": f"/update-rounds/{e.active_id}"},
        ) from e
    response.headers["Location"] = f"/update-rounds/{row.id}"
    fresh = await run_in_threadpool(records.get_round, state.db, row.id)
    assert fresh is not None
    return round_out(fresh)


@router.get("/update-rounds", response_model=RoundList)
async def list_rounds(
    state: Annotated[AppState, Depends(get_state)],
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    offset: Annotated[int, Query(ge=0, le=DB_INT_MAX)] = 0,
) -> RoundList:
    rows, total = await run_in_threadpool(
        records.list_rounds, state.db, state.settings.lineage, limit, offset
    )
    return RoundList(items=[round_out(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/update-rounds/{round_id}", response_model=RoundOut)
async def get_round(
    round_id: Annotated[int, Path(ge=1, le=DB_INT_MAX)],
    state: Annotated[AppState, Depends(get_state)],
) -> RoundOut:
    row = await run_in_threadpool(records.get_round, state.db, round_id)
    if row is None:
        raise ApiError(404, f"round {round_id} not found")
    return round_out(row)


@router.post(
    "/update-rounds/{round_id}/cancel",
    response_model=RoundOut,
    dependencies=[Depends(require_api_key)],
)
async def cancel_round(
    round_id: Annotated[int, Path(ge=1, le=DB_INT_MAX)],
    state: Annotated[AppState, Depends(get_state)],
) -> RoundOut:
    row = await run_in_threadpool(records.get_round, state.db, round_id)
    if row is None:
        raise ApiError(404, f"round {round_id} not found")
    if not await run_in_threadpool(records.cancel, state.db, round_id):
        raise ApiError(
            409,
            f"round {round_id} is {row.status}; only queued or running rounds can be cancelled",
            "conflict",
        )
    fresh = await run_in_threadpool(records.get_round, state.db, round_id)
    assert fresh is not None
    return round_out(fresh)
