"""What OpenAI's completions and chat requests share, and the model card (vLLM's layout)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator

from app.protocol.common import (
    MIN_TEMPERATURE,
    Lenient,
    Penalty,
    Probability,
    RepetitionPenalty,
    Seed,
    Temperature,
    TopK,
    UnsupportedError,
)
from core.modeling.params import SamplingParams
from core.settings import Settings

# OpenAI's stop list takes up to 4 sequences; the server's own limit applies too.
MAX_N = 16


class StreamOptions(Lenient):
    include_usage: bool = False


class OpenAISampling(Lenient):
    """The sampling fields of both requests (vLLM's extras top_k / repetition_penalty too)."""

    model: str | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = Field(default=None, le=2.0)
    top_p: Probability | None = None
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in stops):
            raise ValueError("`stop` sequences must be non-empty strings")
        return v

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(
        self, settings: Settings, max_tokens: int | None, index: int, top_n: int
    ) -> SamplingParams:
        if self.logit_bias:
            raise UnsupportedError("logit_bias", "logit biases are not supported")
        max_new = max_tokens if max_tokens is not None else settings.default_max_new_tokens
        if max_new > settings.max_new_tokens_limit:
            raise UnsupportedError(
                "max_tokens", f"must be <= {settings.max_new_tokens_limit}. Given: {max_new}"
            )
        if len(self.stops) > settings.max_stop_sequences:
            raise UnsupportedError(
                "stop", f"takes up to {settings.max_stop_sequences} sequences here"
            )
        temperature = 1.0 if self.temperature is None else self.temperature
        # OpenAI: temperature 0 is greedy; below MIN_TEMPERATURE greedy too (as vLLM).
        sample = temperature >= MIN_TEMPERATURE
        seed = None
        if self.seed is not None and sample:
            seed = (self.seed + index) % (2**63)  # n choices: distinct, reproducible
        return SamplingParams(
            max_new_tokens=max_new,
            do_sample=sample,
            temperature=temperature if sample else 1.0,
            top_p=self.top_p if sample and self.top_p is not None and self.top_p < 1 else None,
            top_k=self.top_k if sample else None,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty or None,
            presence_penalty=self.presence_penalty or None,
            seed=seed,
            stop=self.stops,
            top_n_tokens=top_n,
        )


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "selflm"
    root: str | None = None
    parent: str | None = None
    # selflm's own: the champion version this replica serves (the id never changes).
    version: int | None = None
    lineage: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard] = Field(default_factory=list)


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
