"""GET /metrics: JSON report of champion, lineage and rounds; Prometheus text on request."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from app.prometheus import exposition
from app.state import AppState, get_state
from core.report import build_report

router = APIRouter()


@router.get("/metrics", response_model=None)
async def metrics(
    request: Request,
    state: Annotated[AppState, Depends(get_state)],
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    format: Annotated[Literal["json", "prometheus"] | None, Query()] = None,
) -> dict[str, Any] | PlainTextResponse:
    accept = request.headers.get("accept", "")
    prom = format == "prometheus" or (format is None and accept.startswith("text/plain"))
    report = await run_in_threadpool(
        build_report, state.db, state.settings.lineage, 1000 if prom else limit
    )
    if not prom:
        return report
    watcher = state.extras.get("watcher")
    text = exposition(report, state.engine.health(), watcher.status() if watcher else {})
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
