"""The lineage: which checkpoint descends from which (GET /info's `lineage_versions`, and
GET /info/lineage with every version, the champion and what this replica serves)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from app.state import AppState, get_state
from core.db.models import Checkpoint
from core.db.session import Database

router = APIRouter()


def lineage_rows(db: Database, lineage: str) -> list[dict[str, Any]]:
    with db.session() as s:
        rows = s.scalars(
            select(Checkpoint).where(Checkpoint.lineage == lineage).order_by(Checkpoint.version)
        )
        return [
            {
                "version": c.version,
                "parent_version": c.parent_version,
                "status": c.status,
                "produced_by_round": c.produced_by_round,
                "created_at": c.created_at.isoformat(),
                "promoted_at": c.promoted_at.isoformat() if c.promoted_at else None,
            }
            for c in rows
        ]


def ancestry(rows: list[dict[str, Any]], version: int | None) -> list[int]:
    """`version` and its ancestors, the lineage's base first (a cycle cannot loop forever)."""
    parent = {r["version"]: r["parent_version"] for r in rows}
    chain: list[int] = []
    while version is not None and version in parent and version not in chain:
        chain.append(version)
        version = parent[version]
    return chain[::-1]


def lineage_summary(state: AppState) -> dict[str, Any]:
    rows = lineage_rows(state.db, state.settings.lineage)
    info = state.engine.info()
    serving = info.version if info else None
    champion = next((r["version"] for r in rows if r["status"] == "champion"), None)
    return {
        "lineage": state.settings.lineage,
        "champion_version": champion,
        "serving_version": serving,
        "lineage_versions": ancestry(rows, serving if serving is not None else champion),
        "checkpoints": rows,
    }


@router.get("/info/lineage")
async def lineage(state: Annotated[AppState, Depends(get_state)]) -> dict[str, Any]:
    return await run_in_threadpool(lineage_summary, state)
