"""GET /metrics: Prometheus text (OpenMetrics where asked), the JSON report when asked for.

Content negotiation: Prometheus' scrape header (`application/openmetrics-text;...,
text/plain;version=0.0.4;q=0.5,*/*;q=0.1`) gets OpenMetrics; `text/plain` or anything else
gets the classic text format; JSON only for `Accept: application/json` or `?format=json`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from prometheus_client.exposition import (
    CONTENT_TYPE_PLAIN_0_0_4,
    choose_encoder,
    generate_latest,
)
from prometheus_client.openmetrics.exposition import (
    CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE,
)
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from starlette.concurrency import run_in_threadpool

from app.state import AppState, get_state
from core.report import build_report

router = APIRouter(tags=["metrics"])

Format = Literal["json", "prometheus", "openmetrics"]


def negotiate(accept: str, format: Format | None) -> Format:
    if format is not None:
        return format
    types = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    if "application/openmetrics-text" in types:
        return "openmetrics"
    if "application/json" in types and "text/plain" not in types:
        return "json"
    return "prometheus"


@router.get("/metrics", response_model=None)
async def metrics(
    request: Request,
    state: Annotated[AppState, Depends(get_state)],
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    format: Annotated[Format | None, Query()] = None,
) -> dict[str, Any] | Response:
    kind = negotiate(request.headers.get("accept", ""), format)
    if kind == "json":
        report: dict[str, Any] = await run_in_threadpool(
            build_report, state.db, state.settings.lineage, limit
        )
        return report
    registry = state.extras["metrics"].registry
    if format is None:
        # prometheus-client's own negotiation (OpenMetrics versions, name escaping).
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    elif kind == "openmetrics":
        encoder, content_type = generate_openmetrics, OPENMETRICS_CONTENT_TYPE
    else:
        encoder, content_type = generate_latest, CONTENT_TYPE_PLAIN_0_0_4
    body = await run_in_threadpool(encoder, registry)
    # Set the header as is: Response(media_type=...) would append a second charset.
    return Response(body, headers={"content-type": content_type})
