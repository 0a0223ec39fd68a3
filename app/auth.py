"""Bearer API keys and the per-route access policy.

Without keys (`SELFLM_API_KEYS` and `SELFLM_INFERENCE_API_KEYS` empty) every route is open.
With keys, every route but `/health` and `/info` needs one, by group:

- `admin` (mutating: start or cancel rounds, promote): an `api_keys` key, always;
- `inference` (TGI routes, `/tokenize`, `/v1/*`), `reads` (`GET /update-rounds`,
  `GET /checkpoints`), `metrics`, `docs` (`/docs`, `/redoc`, `/openapi.json`): any key,
  unless the group is listed in `SELFLM_OPEN_ROUTES` (then open).

A missing, malformed or unknown token is a 401 (also a non-ASCII one: never a 500); a known
inference key on an admin route is a 403.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import Depends, Request

from app.errors import ApiError
from app.state import AppState, get_state

Group = Literal["admin", "inference", "reads", "metrics", "docs"]


def _matches(token: str, keys: frozenset[str]) -> bool:
    # Bytes, not str: compare_digest refuses non-ASCII str (a TypeError, i.e. a 500).
    raw = token.encode("utf-8", "surrogateescape")
    return any(hmac.compare_digest(raw, k.encode("utf-8")) for k in keys)


def _token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(
            401,
            "missing bearer API key (Authorization: Bearer <key>)",
            headers={"WWW-Authenticate": "Bearer"},
            code="invalid_api_key",
        )
    return token


def check_access(request: Request, state: AppState, group: Group) -> None:
    s = state.settings
    admin, inference = s.api_key_set, s.inference_key_set
    if not admin and not inference:
        return
    if group != "admin" and group in s.open_route_groups:
        return
    token = _token(request)
    if _matches(token, admin):
        return
    if _matches(token, inference):
        if group == "admin":
            raise ApiError(403, "this API key may not change the service", code="forbidden")
        return
    raise ApiError(
        401, "invalid API key", headers={"WWW-Authenticate": "Bearer"}, code="invalid_api_key"
    )


def require_access(group: Group) -> Callable[..., None]:
    def dependency(request: Request, state: Annotated[AppState, Depends(get_state)]) -> None:
        check_access(request, state, group)

    dependency.__name__ = f"require_{group}_access"
    return dependency


# Mutating routes (rounds, checkpoints) declare this one.
require_api_key = require_access("admin")
