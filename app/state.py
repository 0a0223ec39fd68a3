"""What the routes share: settings, database and engine, built in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from app.engine.interface import Engine
from app.errors import ApiError
from core.db.session import Database
from core.settings import Settings


@dataclass
class AppState:
    settings: Settings
    db: Database
    engine: Engine
    extras: dict[str, Any] = field(default_factory=dict)


async def get_state(request: Request) -> AppState:
    """Async on purpose: a sync dependency would take a worker thread from the same pool the
    routes' database calls use, so a hung database could starve `/generate`."""
    state: AppState | None = getattr(request.app.state, "selflm", None)
    if state is None:
        raise ApiError(503, "the service is starting", "unavailable")
    return state
