"""The FastAPI application and its lifespan (database, base checkpoint, engine)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from app import errors
from app.engine.interface import Engine
from app.routes import checkpoints, data, generate, health, metrics, openai, rounds, stream
from app.state import AppState
from app.swap import SwapWatcher
from core import __version__
from core.db.session import Database, upgrade
from core.settings import Settings

log = logging.getLogger(__name__)


def _start(settings: Settings, engine: Engine | None) -> AppState:
    """Blocking start-up: migrations (SQLite), base checkpoint, engine with the champion."""
    from core.registry import ensure_base_checkpoint

    if settings.database_url.startswith("sqlite"):
        upgrade(settings.database_url)  # the embedded start migrates itself
    db = Database(settings.database_url)
    champion = ensure_base_checkpoint(settings, db)
    if engine is None:
        from app.engine.torch_engine import TorchEngine

        engine = TorchEngine(settings)
    engine.swap(engine.load(champion.version, champion.path, champion.manifest))
    state = AppState(settings=settings, db=db, engine=engine)
    watcher = SwapWatcher(settings, db, engine)
    watcher.start()
    state.extras["watcher"] = watcher
    state.extras["on_shutdown"] = [watcher.stop]
    return state


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await run_in_threadpool(_start, settings, engine)
        app.state.selflm = state
        log.info("serving %s", state.engine.info())
        try:
            yield
        finally:
            for hook in state.extras.get("on_shutdown", []):
                hook()
            state.engine.close()
            state.db.dispose()

    app = FastAPI(title="selflm", version=__version__, lifespan=lifespan)
    errors.install(app)

    @app.middleware("http")
    async def model_version_header(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        # /generate sets the version that produced the text; others get the serving one.
        if "x-model-version" not in response.headers:
            state: AppState | None = getattr(request.app.state, "selflm", None)
            info = state.engine.info() if state is not None else None
            if info is not None:
                response.headers["x-model-version"] = str(info.version)
        return response

    app.include_router(generate.router)
    app.include_router(stream.router)
    app.include_router(openai.router)
    app.include_router(health.router)
    app.include_router(rounds.router)
    app.include_router(metrics.router)
    app.include_router(checkpoints.router)
    app.include_router(data.router)
    return app
