"""GET /dashboard: one page (HTML, CSS, JS and its SVG charts inside the package; no CDN).

The page polls the JSON API (/health, /info/lineage, /metrics, /update-rounds) and drives the
mutating routes with a bearer key the user types in (kept in sessionStorage).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.errors import ApiError

router = APIRouter()

STATIC = Path(__file__).resolve().parent.parent / "static"
TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript", ".txt": "text/plain"}


@router.get("/dashboard", include_in_schema=False)
async def dashboard() -> FileResponse:
    return FileResponse(
        STATIC / "dashboard.html", media_type="text/html", headers={"cache-control": "no-cache"}
    )


@router.get("/dashboard/static/{name}", include_in_schema=False)
async def static(name: str) -> FileResponse:
    path = STATIC / name
    if "/" in name or name.startswith(".") or path.suffix not in TYPES or not path.is_file():
        raise ApiError(404, f"no dashboard file {name!r}")
    return FileResponse(path, media_type=TYPES[path.suffix], headers={"cache-control": "no-cache"})
