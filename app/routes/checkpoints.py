"""GET /checkpoints (lineage) and POST /checkpoints/{version}/promote (manual / rollback)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from app.auth import require_api_key
from app.errors import ApiError
from app.schemas import DB_INT_MAX
from app.state import AppState, get_state
from app.swap import lower_thread_priority
from core import registry
from core.report import build_report

router = APIRouter()


@router.get("/checkpoints")
async def list_checkpoints(state: Annotated[AppState, Depends(get_state)]) -> dict[str, Any]:
    report = await run_in_threadpool(build_report, state.db, state.settings.lineage)
    return {"champion_version": report["champion_version"], "items": report["checkpoints"]}


def _promote(state: AppState, version: int) -> dict[str, Any]:
    lineage = state.settings.lineage
    # The promotion re-hashes the checkpoint's files (hundreds of MB): in a thread at the
    # swap's niceness, so a manual promotion or rollback does not slow the batches being
    # decoded beside it (at normal priority it took a core from them, docs/benchmarks.md).
    verifier = ThreadPoolExecutor(
        1, "promote", initializer=lower_thread_priority, initargs=(state.settings.swap_nice,)
    )
    try:
        verifier.submit(
            registry.promote, state.db, lineage, version, redis_url=state.settings.redis_url
        ).result()
    except registry.CheckpointNotFoundError as e:
        raise ApiError(404, str(e)) from e
    except registry.PromotionConflict as e:
        raise ApiError(409, str(e), "conflict") from e
    except registry.CheckpointError as e:
        raise ApiError(409, f"checkpoint v{version} failed verification: {e}", "conflict") from e
    finally:
        verifier.shutdown()
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
