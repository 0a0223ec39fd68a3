"""The OpenAPI document lists the errors each route really answers, in the schema it answers
them with: TGI's `{"error", "error_type"}` (ErrorResponse), or OpenAI's envelope under /v1.

FastAPI documents only 200 and a 422 in its own validation schema, which this service never
sends. `install(app)` replaces that with what the error handlers produce, derived from each
operation in the document (body: 413/422; path parameters: 404; generation: 429 with
Retry-After, 504; API keys: 401/403; 500/503 everywhere) plus a few route-specific codes.
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
    return codes | set(EXTRA.get((method, path), ()))


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
            for code in sorted(error_codes(method, path, op)):
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
