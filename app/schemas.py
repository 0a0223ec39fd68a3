"""Bodies of the service's own routes (health, info, errors). The dialects' request and
response models live in app/protocol/ (TGI, OpenAI)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

# Ids, versions and offsets are 32-bit integer columns on PostgreSQL: a larger one cannot
# exist, and the database would refuse it with an error (a 500); the routes answer 422.
DB_INT_MAX = 2**31 - 1


class ErrorResponse(BaseModel):
    error: str
    error_type: str


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded", "unavailable"]
    model_loaded: bool
    database: bool
    serving_version: int | None
    wanted_version: int | None = None
    swap_error: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class InfoResponse(BaseModel):
    model_id: str
    model_version: int
    model_dtype: str
    model_device_type: str
    loaded_at: str
    max_input_tokens: int
    max_total_tokens: int
    max_new_tokens: int
    max_stop_sequences: int
    max_batch_size: int
    lineage: str
    version: str
    # The champion, and the served version with its ancestors (base first): /info/lineage has more.
    champion_version: int | None = None
    lineage_versions: list[int] = Field(default_factory=list)
