"""Bearer API keys for mutating routes (only when SELFLM_API_KEYS is set)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from app.errors import ApiError
from app.state import AppState, get_state


def require_api_key(request: Request, state: Annotated[AppState, Depends(get_state)]) -> None:
    keys = state.settings.api_key_set
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "missing bearer API key", headers={"WWW-Authenticate": "Bearer"})
    if not any(hmac.compare_digest(token.strip(), k) for k in keys):
        raise ApiError(403, "invalid API key")
