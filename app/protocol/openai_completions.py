"""POST /v1/completions: the request (OpenAI's schema; a list of prompts, echo, best_of)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from app.protocol.common import UnsupportedError
from app.protocol.openai import OpenAISampling
from core.modeling.params import SamplingParams
from core.settings import Settings

MAX_LOGPROBS = 5  # OpenAI's limit for completions


class CompletionRequest(OpenAISampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    best_of: int | None = Field(default=None, ge=1, le=16)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        prompts = [v] if isinstance(v, str) else v
        if not prompts:
            raise ValueError("`prompt` cannot be empty")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("token-id prompts are not supported: send text")
        if any(not p.strip() for p in prompts):
            raise ValueError("`prompt` cannot be empty")
        return v

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError("`best_of` must be >= `n`")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else [str(p) for p in self.prompt]

    @property
    def candidates(self) -> int:
        return self.best_of or self.n

    def check_supported(self) -> None:
        if self.suffix:
            raise UnsupportedError("suffix", "insertion (suffix) is not supported")
        if self.stream and self.candidates > self.n:
            raise UnsupportedError("best_of", "best_of > n cannot be streamed")

    def to_sampling_params(self, settings: Settings, index: int = 0) -> SamplingParams:
        return self.sampling_params(settings, self.max_tokens, index, self.logprobs or 0)
