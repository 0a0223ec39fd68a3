"""The serving engine's interface and its result types (no torch here: routes import this)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from core.modeling.params import FinishReason, SamplingParams, TokenInfo


class EngineValidationError(ValueError):
    """The request cannot be served as asked (TGI answers these with 422 `validation`)."""


class EngineOverloadedError(RuntimeError):
    """The request is shed: the queue is full or its wait would be too long (429
    `overloaded`, with `Retry-After: retry_after` seconds)."""

    def __init__(self, message: str = "Model is overloaded", retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineDeadlineError(RuntimeError):
    """The request's deadline passed before it finished (504 `timeout`)."""


class RequestCancelledError(RuntimeError):
    """The client went away; its work was dropped (499, which nobody reads)."""


class EngineNotReadyError(RuntimeError):
    """No model is loaded yet (503)."""


@dataclass(frozen=True)
class StreamToken:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass
class GenerationResult:
    text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    model_version: int
    prompt_tokens: int
    tokens: list[TokenInfo] = field(default_factory=list)


@dataclass
class ModelInfo:
    version: int
    model_id: str
    dtype: str
    device: str
    max_context: int
    loaded_at: datetime
    weights_bytes: int


class Engine(Protocol):
    """What the app needs from an engine; built in the app's lifespan."""

    def count_prompt_tokens(self, prompt: str, params: SamplingParams) -> int: ...

    async def generate(
        self, prompt: str, params: SamplingParams, details: bool = False
    ) -> GenerationResult: ...

    def stream(
        self, prompt: str, params: SamplingParams
    ) -> AsyncIterator[StreamToken | GenerationResult]: ...

    def load(self, version: int, path: str, manifest: dict[str, Any] | None) -> Any: ...

    def swap(self, loaded: Any) -> None: ...

    def health(self) -> dict[str, Any]: ...

    def info(self) -> ModelInfo | None: ...

    def close(self) -> None: ...
