"""GET /checkpoints (lineage) and POST /checkpoints/{version}/promote (manual / rollback)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from app.auth import require_api_key
from app.errors import ApiError
from app.schemas import DB_INT_MAX
from app.state import AppState, get_state
from core.notify import announce
from core.registry import get_checkpoint, promote
from core.report import build_report
from core.store import CheckpointError, verify_checkpoint

router = APIRouter()

PROMOTABLE = ("retired", "candidate", "champion")


@router.get("/checkpoints")
async def list_checkpoints(state: Annotated[AppState, Depends(get_state)]) -> dict[str, Any]:
    report = await run_in_threadpool(build_report, state.db, state.settings.lineage)
    return {"champion_version": report["champion_version"], "items": report["checkpoints"]}


def _promote(state: AppState, version: int) -> dict[str, Any]:
    lineage = state.settings.lineage
    with state.db.session() as s:
        row = get_checkpoint(s, lineage, version)
        if row is None:
            raise ApiError(404, f"checkpoint v{version} not found")
        if row.status not in PROMOTABLE:
            raise ApiError(
                409, f"checkpoint v{version} is {row.status}; cannot promote", "conflict"
            )
        path, manifest = row.path, row.manifest
    try:
        verify_checkpoint(Path(path), manifest)  # never point replicas at a broken checkpoint
    except CheckpointError as e:
        raise ApiError(409, f"checkpoint v{version} failed verification: {e}", "conflict") from e
    with state.db.session() as s:
        promote(s, lineage, version)
    announce(state.settings.redis_url, lineage, version)
    watcher = state.extras.get("watcher")
    if watcher is not None:
        watcher.poke()
    return {"champion_version": version, "lineage": lineage}


@router.post("/checkpoints/{version}/promote", dependencies=[Depends(require_api_key)])
async def promote_checkpoint(
    version: Annotated[int, PathParam(ge=0, le=DB_INT_MAX)],
    state: Annotated[AppState, Depends(get_state)],
) -> dict[str, Any]:
    return await run_in_threadpool(_promote, state, version)
