"""Request and response bodies. `/generate` follows Text Generation Inference's schema."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Ids, versions and offsets are 32-bit integer columns on PostgreSQL: a larger one cannot
# exist, and the database would refuse it with an error (a 500); the routes answer 422.
DB_INT_MAX = 2**31 - 1

# Below these a sampling temperature or repetition penalty over- or underflows float32
# logits (1e-50 is 0.0 in float32): refused at the edge, where the message can say so.
MIN_TEMPERATURE = 1e-4
MIN_REPETITION_PENALTY = 1e-4


def _no_lone_surrogates(value: Any) -> Any:
    """A JSON "\ud800" escape decodes to a str no tokenizer, database or UTF-8 encoder
    accepts: refuse it at the edge (422) instead of failing deep inside (500)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError("text must be valid Unicode (no lone surrogates)") from e
    elif isinstance(value, list | tuple):
        for item in value:
            _no_lone_surrogates(item)
    return value


class Strict(BaseModel):
    # Unknown fields are a client bug (a typo silently ignored is worse): 422. NaN and
    # infinities (Python's JSON parser accepts them) are never a valid parameter: 422.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, v: Any) -> Any:
        return _no_lone_surrogates(v)


class GenerateParameters(Strict):
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    do_sample: bool = False
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list)
    repetition_penalty: float | None = None
    return_full_text: bool = False
    details: bool = False
    truncate: int | None = None

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError("`temperature` must be strictly positive")
        if v is not None and v < MIN_TEMPERATURE:
            raise ValueError(
                f"`temperature` must be >= {MIN_TEMPERATURE} (use `do_sample: false` for greedy)"
            )
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v <= 1:
            raise ValueError("`top_p` must be > 0.0 and <= 1.0")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("`top_k` must be strictly positive")
        return v

    @field_validator("repetition_penalty")
    @classmethod
    def _rep(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError("`repetition_penalty` must be strictly positive")
        if v is not None and v < MIN_REPETITION_PENALTY:
            raise ValueError(f"`repetition_penalty` must be >= {MIN_REPETITION_PENALTY}")
        return v

    @field_validator("truncate")
    @classmethod
    def _truncate(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("`truncate` must be strictly positive")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("`stop` sequences must be non-empty strings")
        return v


class GenerateRequest(Strict):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, v: Any) -> Any:
        if not isinstance(v, str):
            raise ValueError("`inputs` must be a string")
        if not v.strip():
            raise ValueError("`inputs` cannot be empty")
        return v


class Token(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool


class Details(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    prefill: list[Token] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


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
