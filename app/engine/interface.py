"""The serving engine's interface and its result types (no torch here: routes import this)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from core.modeling.params import FinishReason, SamplingParams, TokenInfo, TopToken
from core.registry import CheckpointRef


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
    top: tuple[TopToken, ...] = ()


@dataclass
class GenerationResult:
    text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    model_version: int
    prompt_tokens: int
    tokens: list[TokenInfo] = field(default_factory=list)
    # Timings from the engine (seconds): waiting in the queue, enqueue to first token.
    queue_s: float = 0.0
    first_token_s: float | None = None
    total_s: float = 0.0


@dataclass
class PromptDetails:
    """The prompt's tokens with their log-probabilities (TGI's prefill, OpenAI's echo)."""

    tokens: list[TokenInfo]


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

    def tokenize(self, text: str) -> list[tuple[int, str, int, int]]: ...

    def decode_tokens(self, ids: list[int]) -> dict[int, str]: ...

    def prompt_details(self, prompt: str, params: SamplingParams) -> PromptDetails: ...

    def chat_prompt(self, messages: list[dict[str, str]]) -> str: ...

    async def generate(
        self, prompt: str, params: SamplingParams, details: bool = False
    ) -> GenerationResult: ...

    def stream(
        self, prompt: str, params: SamplingParams
    ) -> AsyncIterator[StreamToken | GenerationResult]: ...

    def load(self, ref: CheckpointRef) -> Any: ...

    def swap(self, loaded: Any) -> None: ...

    def health(self) -> dict[str, Any]: ...

    def info(self) -> ModelInfo | None: ...

    def close(self) -> None: ...
