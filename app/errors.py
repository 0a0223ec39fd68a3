"""Errors in TGI's JSON form: {"error": str, "error_type": str}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.engine.interface import (
    EngineDeadlineError,
    EngineNotReadyError,
    EngineOverloadedError,
    EngineValidationError,
    RequestCancelledError,
)

log = logging.getLogger(__name__)

_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    422: "validation",
    429: "overloaded",
    499: "cancelled",
    503: "unavailable",
    504: "timeout",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or _TYPES.get(status, "error")
        self.headers = headers


def error_response(
    status: int, message: str, error_type: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": message, "error_type": error_type or _TYPES.get(status, "error")},
        status_code=status,
        headers=headers,
    )


def _describe(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _describe(exc), "validation")

    @app.exception_handler(EngineValidationError)
    async def _engine_validation(_: Request, exc: EngineValidationError) -> JSONResponse:
        return error_response(422, str(exc), "validation")

    @app.exception_handler(EngineOverloadedError)
    async def _overloaded(_: Request, exc: EngineOverloadedError) -> JSONResponse:
        return error_response(429, str(exc), "overloaded", {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(EngineDeadlineError)
    async def _deadline(_: Request, exc: EngineDeadlineError) -> JSONResponse:
        return error_response(504, str(exc), "timeout")

    @app.exception_handler(RequestCancelledError)
    async def _cancelled(_: Request, exc: RequestCancelledError) -> JSONResponse:
        return error_response(499, str(exc), "cancelled")  # the client is gone: for the logs

    @app.exception_handler(EngineNotReadyError)
    async def _not_ready(_: Request, exc: EngineNotReadyError) -> JSONResponse:
        return error_response(503, str(exc), "unavailable")

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.error_type, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(
            exc.status_code, str(exc.detail), None, dict(exc.headers) if exc.headers else None
        )

    # The database is unreachable, timed out or out of connections: the service is up but
    # cannot do this now (503, as the README promises), not broken (500).
    async def _database(_: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        return error_response(
            503, "database unavailable; retry later", "unavailable", {"Retry-After": "5"}
        )

    for cls in (
        sa_exc.OperationalError,
        sa_exc.InterfaceError,
        sa_exc.TimeoutError,
        sa_exc.DisconnectionError,
    ):
        app.add_exception_handler(cls, _database)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal error", "internal")
