"""Round data uploads: PUT /data/{name}, GET /data (the operator's round data directory).

A round's `prompt_file` / `corpus` name a file here; nothing else on the server can be read
by a round. Uploads are streamed to a temporary file, capped at SELFLM_ROUND_DATA_MAX_BYTES
(413 past it) and renamed into place.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from app.auth import require_api_key
from app.errors import ApiError
from app.state import AppState, get_state
from core import datafiles

router = APIRouter()


class DataFile(BaseModel):
    name: str
    bytes: int


class DataList(BaseModel):
    items: list[DataFile]


class _TooLarge(Exception):
    pass


@router.put(
    "/data/{name:path}",
    status_code=201,
    response_model=DataFile,
    dependencies=[Depends(require_api_key)],
    responses={413: {"description": "body larger than SELFLM_ROUND_DATA_MAX_BYTES"}},
)
async def put_data(
    name: str, request: Request, state: Annotated[AppState, Depends(get_state)]
) -> DataFile:
    """Store the request body as data file `name` (replacing one of the same name)."""
    try:
        clean = datafiles.check_name(name)
    except datafiles.DataFileError as e:
        raise ApiError(422, str(e), "validation") from None
    limit = state.settings.round_data_max_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"data is larger than {limit} bytes", "payload_too_large")
    # Spool the body to memory chunks bounded by `limit`, then write it off the loop.
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"data is larger than {limit} bytes", "payload_too_large")
        chunks.append(chunk)

    def _write() -> tuple[str, int]:
        it: Iterator[bytes] = iter(chunks)
        return datafiles.write_file(state.settings.round_data_path, clean, it, limit)

    try:
        stored, n = await run_in_threadpool(_write)
    except datafiles.DataFileError as e:
        raise ApiError(422, str(e), "validation") from None
    return DataFile(name=stored, bytes=n)


@router.get("/data", response_model=DataList, dependencies=[Depends(require_api_key)])
async def list_data(state: Annotated[AppState, Depends(get_state)]) -> DataList:
    """The data files a round may name (relative names and sizes)."""
    items: list[dict[str, Any]] = await anyio.to_thread.run_sync(
        datafiles.list_names, state.settings.round_data_path
    )
    return DataList(items=[DataFile(name=str(i["name"]), bytes=int(i["bytes"])) for i in items])
