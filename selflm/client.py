"""A small HTTP client for a running selflm server (what the `selflm` client commands use).

The server's URL comes from `--url` or `SELFLM_URL`; a bearer key from `SELFLM_API_KEY` (one of
the keys the server was given in `SELFLM_API_KEYS`). Errors in either of the server's dialects
(TGI's `{"error", "error_type"}`, OpenAI's `{"error": {"message", "type"}}`) become `ApiError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"


class ApiError(RuntimeError):
    """The server answered with an error status, or could not be reached (`status` 0)."""

    def __init__(self, status: int, message: str, error_type: str = "error") -> None:
        super().__init__(message)
        self.status, self.message, self.error_type = status, message, error_type

    def __str__(self) -> str:
        if self.status == 0:
            return self.message
        return f"HTTP {self.status} {self.error_type}: {self.message}"


def _error_from(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        return ApiError(response.status_code, response.text.strip() or response.reason_phrase)
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):  # OpenAI's dialect
        return ApiError(
            response.status_code, str(err.get("message")), str(err.get("type") or "error")
        )
    if isinstance(err, str):  # TGI's dialect
        return ApiError(response.status_code, err, str(body.get("error_type") or "error"))
    return ApiError(response.status_code, json.dumps(body))


class Client:
    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = (url or os.environ.get("SELFLM_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("SELFLM_API_KEY", "")
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------
    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise ApiError(0, f"cannot reach {self.url}: {e}", "connection") from e
        if r.status_code >= 400:
            raise _error_from(r)
        return r

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw).json()

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, json=body, **kw).json()

    def _sse(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST `body` and yield each Server-Sent Event's JSON payload."""
        try:
            with self._http.stream("POST", path, json=body, timeout=None) as r:
                if r.status_code >= 400:
                    r.read()
                    raise _error_from(r)
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    yield json.loads(data)
        except httpx.TransportError as e:
            raise ApiError(0, f"cannot reach {self.url}: {e}", "connection") from e

    # -- rounds --------------------------------------------------------------------------
    def start_round(self, params: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = self.post("/update-rounds", params)
        return out

    def get_round(self, round_id: int) -> dict[str, Any]:
        out: dict[str, Any] = self.get(f"/update-rounds/{round_id}")
        return out

    def list_rounds(self, limit: int = 20, offset: int = 0) -> dict[str, Any]:
        out: dict[str, Any] = self.get("/update-rounds", params={"limit": limit, "offset": offset})
        return out

    def cancel_round(self, round_id: int) -> dict[str, Any]:
        out: dict[str, Any] = self.post(f"/update-rounds/{round_id}/cancel")
        return out

    # -- checkpoints ---------------------------------------------------------------------
    def checkpoints(self) -> dict[str, Any]:
        out: dict[str, Any] = self.get("/checkpoints")
        return out

    def promote(self, version: int) -> dict[str, Any]:
        out: dict[str, Any] = self.post(f"/checkpoints/{version}/promote")
        return out

    def checkpoint_files(self, version: int) -> dict[str, Any]:
        out: dict[str, Any] = self.get(f"/checkpoints/{version}/files")
        return out

    def download(self, version: int, name: str, dest: Path) -> Iterator[int]:
        """Stream one checkpoint file to `dest`, yielding the bytes written per chunk."""
        try:
            with self._http.stream(
                "GET", f"/checkpoints/{version}/files/{name}", timeout=None
            ) as r:
                if r.status_code >= 400:
                    r.read()
                    raise _error_from(r)
                with dest.open("wb") as f:
                    for chunk in r.iter_bytes(1 << 20):
                        f.write(chunk)
                        yield len(chunk)
        except httpx.TransportError as e:
            raise ApiError(0, f"cannot reach {self.url}: {e}", "connection") from e

    # -- generation ----------------------------------------------------------------------
    def generate(self, inputs: str, parameters: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = self.post(
            "/generate", {"inputs": inputs, "parameters": parameters}, timeout=None
        )
        return out

    def generate_stream(self, inputs: str, parameters: dict[str, Any]) -> Iterator[dict[str, Any]]:
        return self._sse("/generate_stream", {"inputs": inputs, "parameters": parameters})

    def chat_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        return self._sse("/v1/chat/completions", {**body, "stream": True})
