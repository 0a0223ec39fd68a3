"""GET /checkpoints/{version}/files[/{name}]: a checkpoint's files over HTTP (`selflm export`).

Only the files the checkpoint's manifest lists (the Hugging Face files: weights, config,
tokenizer) are served, each with its sha256, so a client on another host can rebuild a plain
`from_pretrained` directory and check every byte. Guarded by the API key when keys are set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from app.auth import require_api_key
from app.errors import ApiError
from app.schemas import DB_INT_MAX
from app.state import AppState, get_state
from core.registry import get_checkpoint

router = APIRouter(dependencies=[Depends(require_api_key)])
Version = Annotated[int, PathParam(ge=0, le=DB_INT_MAX)]


def _files(state: AppState, version: int) -> tuple[Path, dict[str, str]]:
    with state.db.session() as s:
        row = get_checkpoint(s, state.settings.lineage, version)
        if row is None:
            raise ApiError(404, f"checkpoint v{version} not found")
        files: dict[str, str] = dict(row.manifest.get("files", {}))
        return Path(row.path), files


@router.get("/checkpoints/{version}/files")
async def list_files(
    version: Version, state: Annotated[AppState, Depends(get_state)]
) -> dict[str, Any]:
    root, files = await run_in_threadpool(_files, state, version)
    items = []
    for name, digest in sorted(files.items()):
        p = root / name
        if not p.is_file():
            raise ApiError(409, f"checkpoint v{version} is missing {name} on this host", "conflict")
        items.append({"name": name, "size": p.stat().st_size, "sha256": digest})
    return {"version": version, "files": items}


@router.get("/checkpoints/{version}/files/{name:path}", response_model=None)
async def get_file(
    version: Version, name: str, state: Annotated[AppState, Depends(get_state)]
) -> FileResponse:
    root, files = await run_in_threadpool(_files, state, version)
    if name not in files:  # the manifest is the allow-list: no path ever leaves the directory
        raise ApiError(404, f"checkpoint v{version} has no file {name!r}")
    path = root / name
    if not path.is_file():
        raise ApiError(409, f"checkpoint v{version} is missing {name} on this host", "conflict")
    return FileResponse(
        path,
        media_type="application/octet-stream",
        headers={"x-checksum-sha256": files[name]},
    )
