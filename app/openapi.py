"""The OpenAPI document lists the errors each route really answers, in the schema it answers
them with: TGI's `{"error", "error_type"}` (ErrorResponse), or OpenAI's envelope under /v1.

FastAPI documents only 200 and a 422 in its own validation schema, which this service never
sends. `install(app)` replaces that with what the error handlers produce, derived from each
operation in the document (body: 413/422; path parameters: 404; generation: 429 with
Retry-After, 504; API keys: 401/403; 500/503 everywhere; under /v1 an invalid request is a
400, never a 422) plus a few route-specific codes, and adds the 200 bodies that are not JSON
(Prometheus text, server-sent events).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from app.schemas import ErrorResponse


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail


DESCRIPTIONS = {
    400: "Malformed request",
    401: "Missing bearer API key",
    403: "Invalid API key",
    404: "Not found",
    409: "Conflict with the current state",
    413: "Request body larger than the server's limit",
    422: "Invalid parameters",
    429: "Overloaded: retry after `Retry-After` seconds",
    500: "Internal error",
    503: "Unavailable (no model loaded, database or broker down)",
    504: "The request's deadline passed before it finished",
}

# Codes a route answers beyond what its signature tells.
EXTRA: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/update-rounds"): (409,),
    ("post", "/update-rounds/{round_id}/cancel"): (409,),
    ("post", "/checkpoints/{version}/promote"): (409,),
    ("post", "/v1/completions"): (404,),  # a `model` other than the served one
    ("post", "/v1/chat/completions"): (404,),
}
SSE = "text/event-stream"
# One server-sent event, as OpenAPI 3.2 models a `text/event-stream` item (before 3.2 a
# stream's `schema` describes each event): `data` is a JSON chunk of the route's dialect
# (OpenAI's stream ends with `[DONE]`).
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
    },
}
# 200 bodies that are not (only) JSON: their media types, and whether JSON stays documented
# (a route that only streams never answers a JSON 200).
MEDIA_200: dict[tuple[str, str], tuple[tuple[str, ...], bool]] = {
    ("get", "/metrics"): (("text/plain", "application/openmetrics-text"), True),
    ("post", "/generate_stream"): ((SSE,), False),
    ("post", "/"): ((SSE,), True),  # `stream: true`
    ("post", "/v1/completions"): ((SSE,), True),
    ("post", "/v1/chat/completions"): ((SSE,), True),
}
# Routes whose error body is not an error object (e.g. /health's 503 is its usual body).
OWN_BODY: dict[tuple[str, str], dict[int, str]] = {
    ("get", "/health"): {503: "HealthResponse"},
}


def error_codes(method: str, path: str, op: dict[str, Any]) -> set[int]:
    """What the error handlers can answer for this operation, read from the document
    itself (so routes added later are covered too)."""
    codes = {500, 503}
    if path != "/health":
        codes |= {401, 403}  # any route may require a key, depending on the settings
    params = op.get("parameters", [])
    if "requestBody" in op:
        codes |= {400, 413, 422}  # 400: a body that is not JSON at all
    if params:
        codes.add(422)
    if any(p.get("in") == "path" for p in params):
        codes.add(404)
    if path.startswith(("/generate", "/v1/")):
        codes |= {422, 429, 504}  # the engine's: validation, shedding, deadline
    codes |= set(EXTRA.get((method, path), ()))
    if path.startswith("/v1/") and 422 in codes:
        codes = (codes - {422}) | {400}  # OpenAI's status for an invalid request
    return codes


def _non_json_200(op: dict[str, Any], media: tuple[str, ...], keep_json: bool) -> None:
    ok = op.setdefault("responses", {}).setdefault("200", {"description": "Successful Response"})
    content = ok.setdefault("content", {})
    if not keep_json:
        content.pop("application/json", None)
    for kind in media:
        content[kind] = {"schema": SSE_EVENT if kind == SSE else {"type": "string"}}


def _response(code: int, schema: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema}"}
    out: dict[str, Any] = {
        "description": DESCRIPTIONS.get(code, "Error"),
        "content": {"application/json": {"schema": ref}},
    }
    if code == 429:
        out["headers"] = {
            "Retry-After": {
                "description": "Seconds until the queue is expected to have room",
                "schema": {"type": "integer", "minimum": 1},
            }
        }
    return out


def _add_models(components: dict[str, Any], *models: type[BaseModel]) -> None:
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema


def document(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(
        title=app.title,
        version=app.version,
        openapi_version=app.openapi_version,
        description=app.description,
        routes=app.routes,
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    _add_models(components, ErrorResponse, OpenAIErrorResponse)
    for path, ops in schema.get("paths", {}).items():
        error_schema = "OpenAIErrorResponse" if path.startswith("/v1/") else "ErrorResponse"
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            own = OWN_BODY.get((method, path), {})
            if (method, path) in MEDIA_200:
                _non_json_200(op, *MEDIA_200[(method, path)])
            codes = error_codes(method, path, op)
            if 422 not in codes:
                responses.pop("422", None)  # FastAPI's validation body, never sent here
            for code in sorted(codes):
                responses[str(code)] = _response(code, own.get(code, error_schema))
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
