"""What the routes share: settings, database and engine, built in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from app.engine.interface import Engine
from core.db.session import Database
from core.settings import Settings


@dataclass
class AppState:
    settings: Settings
    db: Database
    engine: Engine
    extras: dict[str, Any] = field(default_factory=dict)


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.selflm
    return state
