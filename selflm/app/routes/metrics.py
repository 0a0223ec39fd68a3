"""GET /metrics: JSON report of champion, lineage and rounds."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from starlette.concurrency import run_in_threadpool

from selflm.app.state import AppState, get_state
from selflm.metrics_report import build_report

router = APIRouter()


@router.get("/metrics")
async def metrics(
    state: Annotated[AppState, Depends(get_state)],
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    return await run_in_threadpool(build_report, state.db, state.settings.lineage, limit)
