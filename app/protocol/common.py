"""What the dialects share: strict models, bounded finite numbers, the engine's limits."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Below this, a temperature divides logits into overflow (1e-50 made torch.multinomial raise
# in the batcher). TGI's surface rejects it; OpenAI's treats it as greedy, as vLLM does.
MIN_TEMPERATURE = 1e-2
MAX_SEED = 2**63 - 1

# Finite, bounded numbers at the edge: NaN, inf and 1e-320 never reach the sampler.
Temperature = Annotated[float, Field(allow_inf_nan=False, ge=0.0, le=100.0)]
Probability = Annotated[float, Field(allow_inf_nan=False, gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(allow_inf_nan=False, ge=-2.0, le=2.0)]
RepetitionPenalty = Annotated[float, Field(allow_inf_nan=False, ge=0.01, le=100.0)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
TopK = Annotated[int, Field(gt=0, le=1_000_000)]


def _no_lone_surrogates(value: Any) -> Any:
    """A JSON "\\ud800" escape decodes to a str no tokenizer, database or UTF-8 encoder
    accepts: refuse it at the edge (422) instead of failing deep inside (500)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError("text must be valid Unicode (no lone surrogates)") from e
    elif isinstance(value, list | tuple):
        for item in value:
            _no_lone_surrogates(item)
    elif isinstance(value, dict):
        for item in value.values():
            _no_lone_surrogates(item)
    return value


class _Edge(BaseModel):
    """NaN and infinities (Python's JSON parser accepts them) are never a valid number, and
    lone surrogates never valid text: 422 at the edge, whatever the field."""

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, v: Any) -> Any:
        return _no_lone_surrogates(v)


class Strict(_Edge):
    # Unknown fields are a client bug (a typo silently ignored is worse): 422.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Lenient(_Edge):
    # OpenAI clients send fields of newer API versions; unknown ones are ignored (as vLLM).
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class UnsupportedError(ValueError):
    """A field's value is valid but cannot be honored here (422 / 400, naming the field)."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"`{field}`: {why}")
        self.field = field
