"""The edge of a request: its body size, its deadline header, and whether its client is
still there.

`RequestGuard` is a pure ASGI middleware around the routes:

- it counts the body's bytes as they stream in and stops at `max_body_bytes` (a declared
  Content-Length over the limit stops it before the first byte is read). The 413 is raised
  inside the route's body read, so the app's error handlers answer it in the route's
  dialect. (FastAPI's own `max_body_size` answers a declared-too-long body in plain text,
  whatever the route; hence this one.)
- it keeps the client's `X-Request-Timeout` for the engine (`current_request()`);
- once the body is read it watches the connection, so the engine can drop the work of a
  client that went away (`current_request().disconnected`), streaming or not.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from dataclasses import dataclass, field

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TIMEOUT_HEADER = "x-request-timeout"


@dataclass
class RequestContext:
    timeout_header: str | None = None
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)


_current: ContextVar[RequestContext | None] = ContextVar("selflm_request", default=None)


def current_request() -> RequestContext | None:
    """The HTTP request being served in this task (None outside one: tests, the CLI)."""
    return _current.get()


class BodyTooLargeError(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")


def _content_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class RequestGuard:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        headers = Headers(scope=scope)
        declared = _content_length(headers)
        ctx = RequestContext(timeout_header=headers.get(TIMEOUT_HEADER))
        watcher: asyncio.Task[None] | None = None
        received = 0
        body_read = False

        async def watch() -> None:
            # After the body the server has one message left for us: the disconnect (or,
            # once the response is complete, its stand-in).
            while (await receive())["type"] != "http.disconnect":
                pass
            ctx.disconnected.set()

        async def guarded_receive() -> Message:
            nonlocal body_read, watcher, received
            if body_read:  # the app listens for the disconnect: share the watcher's
                await ctx.disconnected.wait()
                return {"type": "http.disconnect"}
            if declared is not None and declared > limit:
                raise BodyTooLargeError(limit)
            message = await receive()
            if message["type"] == "http.disconnect":
                ctx.disconnected.set()
            elif message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(limit)
                if not message.get("more_body", False):
                    body_read = True
                    watcher = asyncio.ensure_future(watch())
            return message

        token = _current.set(ctx)
        try:
            await self.app(scope, guarded_receive, send)
        finally:
            _current.reset(token)
            if watcher is not None:
                watcher.cancel()
