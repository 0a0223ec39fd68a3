"""Errors in the route's dialect.

TGI's routes (and the service's own) answer `{"error": str, "error_type": str}`; `/v1/*`
answers OpenAI's envelope `{"error": {"message", "type", "param", "code"}}` with OpenAI's
status codes (an invalid request is a 400 there, not a 422), so the `openai` client, LangChain
and litellm show the server's reason.
"""

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
from app.protocol.common import UnsupportedError

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

# OpenAI's error types by status (what its API and vLLM send).
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or _TYPES.get(status, "error")
        self.headers = headers
        self.param = param
        self.code = code


def is_openai(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_response(
    status: int, message: str, error_type: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": message, "error_type": error_type or _TYPES.get(status, "error")},
        status_code=status,
        headers=headers,
    )


def openai_error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    status = 400 if status == 422 else status
    body = {
        "error": {
            "message": message,
            "type": _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "error"),
            "param": param,
            "code": code,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def respond(
    request: Request,
    status: int,
    message: str,
    error_type: str | None = None,
    headers: dict[str, str] | None = None,
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    if is_openai(request.url.path):
        return openai_error_response(status, message, param, code, headers)
    return error_response(status, message, error_type, headers)


def _describe(exc: RequestValidationError) -> tuple[str, str | None]:
    parts = []
    param: str | None = None
    for err in exc.errors():
        path = [str(x) for x in err.get("loc", ()) if x != "body"]
        loc = ".".join(path)
        param = param or (path[0] if path else None)
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request", param


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe(exc)
        return respond(request, 422, message, "validation", param=param)

    @app.exception_handler(UnsupportedError)
    async def _unsupported(request: Request, exc: UnsupportedError) -> JSONResponse:
        return respond(request, 422, str(exc), "validation", param=exc.field)

    @app.exception_handler(EngineValidationError)
    async def _engine_validation(request: Request, exc: EngineValidationError) -> JSONResponse:
        return respond(request, 422, str(exc), "validation")

    @app.exception_handler(EngineOverloadedError)
    async def _overloaded(request: Request, exc: EngineOverloadedError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)}
        return respond(request, 429, str(exc), "overloaded", headers)

    @app.exception_handler(EngineDeadlineError)
    async def _deadline(request: Request, exc: EngineDeadlineError) -> JSONResponse:
        return respond(request, 504, str(exc), "timeout")

    @app.exception_handler(RequestCancelledError)
    async def _cancelled(request: Request, exc: RequestCancelledError) -> JSONResponse:
        return respond(request, 499, str(exc), "cancelled")  # the client is gone: for the logs

    @app.exception_handler(EngineNotReadyError)
    async def _not_ready(request: Request, exc: EngineNotReadyError) -> JSONResponse:
        return respond(request, 503, str(exc), "unavailable")

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return respond(
            request, exc.status, exc.message, exc.error_type, exc.headers, exc.param, exc.code
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers) if exc.headers else None
        return respond(request, exc.status_code, str(exc.detail), None, headers)

    # The database is unreachable, timed out or out of connections: the service is up but
    # cannot do this now (503, as the README promises), not broken (500).
    async def _database(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        message = "database unavailable; retry later"
        return respond(request, 503, message, "unavailable", {"Retry-After": "5"})

    for cls in (
        sa_exc.OperationalError,
        sa_exc.InterfaceError,
        sa_exc.TimeoutError,
        sa_exc.DisconnectionError,
    ):
        app.add_exception_handler(cls, _database)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return respond(request, 500, "internal error", "internal")
