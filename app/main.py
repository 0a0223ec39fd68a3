"""The FastAPI application and its lifespan (database, base checkpoint, engine)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from app import errors, openapi
from app.auth import require_access
from app.engine.interface import Engine
from app.limits import RequestGuard
from app.prometheus import ServingMetrics, StateCollector
from app.routes import (
    checkpoint_files,
    checkpoints,
    dashboard,
    data,
    generate,
    health,
    info,
    metrics,
    openai_chat,
    openai_completions,
    openai_models,
    rounds,
    stream,
)
from app.state import AppState
from app.swap import SwapWatcher
from core import __version__
from core.db.session import Database, upgrade
from core.registry import CheckpointRef
from core.settings import Settings

log = logging.getLogger(__name__)

# Routes counted by `selflm_request_*` (the inference surface).
INFERENCE_ROUTES = frozenset(
    {"/", "/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions"}
)


def _start(settings: Settings, engine: Engine | None) -> AppState:
    """Blocking start-up: migrations (SQLite), base checkpoint, engine with the champion.

    A champion whose files are missing or corrupt does not stop the start: the newest
    previously served version that verifies is served instead, and /health says so (an API
    that refuses to start leaves nothing to roll back with).
    """
    from core.db.liveness import Reaper
    from core.registry import ensure_base_checkpoint

    if settings.database_url.startswith("sqlite"):
        upgrade(settings.database_url)  # the embedded start migrates itself
    db = Database.from_settings(settings)
    champion = ensure_base_checkpoint(settings, db)
    if engine is None:
        from app.engine.torch_engine import TorchEngine

        engine = TorchEngine(settings)
    state = AppState(settings=settings, db=db, engine=engine)
    try:
        loaded = engine.load(champion)
    except Exception as e:
        loaded = _load_fallback(settings, db, engine, champion.version, e)
        state.extras["fallback"] = {
            "champion_version": champion.version,
            "serving_version": loaded.info.version,
            "reason": f"{type(e).__name__}: {e}",
        }
    engine.swap(loaded)
    metrics_ = ServingMetrics(StateCollector(state))
    state.extras["metrics"] = metrics_
    if hasattr(engine, "on_batch"):
        engine.on_batch = metrics_.batch_size.observe
    watcher = SwapWatcher(settings, db, engine)
    watcher.start()
    reaper = Reaper(
        db,
        every_s=settings.reaper_interval_s,
        worker_stale_after_s=settings.worker_stale_after_s,
        queued_ttl_s=settings.round_queued_ttl_s,
        round_stale_after_s=settings.round_stale_after_s,
    ).start()
    state.extras["watcher"] = watcher
    state.extras["reaper"] = reaper
    state.extras["on_shutdown"] = [watcher.stop, reaper.stop]
    return state


def _load_fallback(
    settings: Settings, db: Database, engine: Engine, champion: int, error: Exception
) -> Any:
    """The newest earlier-served version (retired) that verifies and loads; else re-raise."""
    from sqlalchemy import select

    from core.db.models import Checkpoint

    log.error("champion v%d cannot be served (%s); looking for a fallback", champion, error)
    with db.session() as s:
        rows = [
            CheckpointRef.of(row)
            for row in s.scalars(
                select(Checkpoint)
                .where(
                    Checkpoint.lineage == settings.lineage,
                    Checkpoint.version != champion,
                    Checkpoint.status.in_(("retired", "champion")),
                )
                .order_by(Checkpoint.version.desc())
            )
        ]
    for ref in rows:
        try:
            loaded = engine.load(ref)
        except Exception as e:
            log.warning("fallback v%d is not usable either: %s", ref.version, e)
            continue
        log.error("SERVING FALLBACK v%d: champion v%d is missing or corrupt", ref.version, champion)
        return loaded
    raise error


def _docs(app: FastAPI) -> None:
    """/openapi.json, /docs and /redoc behind the `docs` access group."""
    guard = [Depends(require_access("docs"))]

    @app.get("/openapi.json", include_in_schema=False, dependencies=guard)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=guard)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="selflm")

    @app.get("/redoc", include_in_schema=False, dependencies=guard)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title="selflm")


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

    app = FastAPI(
        title="selflm",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    errors.install(app)
    # Inside the middleware below, so its 413 reaches the error handlers (app/limits.py).
    app.add_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes)

    @app.middleware("http")
    async def model_version_header(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        state: AppState | None = getattr(request.app.state, "selflm", None)
        # /generate sets the version that produced the text; others get the serving one.
        if "x-model-version" not in response.headers:
            info = state.engine.info() if state is not None else None
            if info is not None:
                response.headers["x-model-version"] = str(info.version)
        path = request.url.path
        if state is not None and request.method == "POST" and path in INFERENCE_ROUTES:
            m: ServingMetrics | None = state.extras.get("metrics")
            if m is not None:
                m.count(path, response.status_code)
        return response

    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["x-model-version", "x-generated-tokens", "x-prompt-tokens"],
        )

    inference: Any = [Depends(require_access("inference"))]
    app.include_router(generate.router, dependencies=inference)
    app.include_router(stream.router, dependencies=inference)
    app.include_router(openai_completions.router, dependencies=inference)
    app.include_router(openai_chat.router, dependencies=inference)
    app.include_router(openai_models.router, dependencies=inference)
    app.include_router(health.router)
    app.include_router(rounds.router, dependencies=[Depends(require_access("reads"))])
    app.include_router(metrics.router, dependencies=[Depends(require_access("metrics"))])
    app.include_router(checkpoints.router, dependencies=[Depends(require_access("reads"))])
    app.include_router(checkpoint_files.router)  # weights: the admin key (its own dependency)
    app.include_router(info.router, dependencies=[Depends(require_access("reads"))])
    app.include_router(dashboard.router)  # the page is static; its data calls carry the key
    app.include_router(data.router)  # uploads: the admin key; listing: its own dependency
    openapi.install(app)  # the real error responses in the document (app/openapi.py)
    _docs(app)
    return app
