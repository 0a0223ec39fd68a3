"""POST /v1/chat/completions: the request (OpenAI's schema, rendered by the chat template)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from app.protocol.common import Lenient, UnsupportedError
from app.protocol.openai import OpenAISampling
from core.modeling.params import SamplingParams
from core.settings import Settings

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat


class TextPart(Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.text().strip() for m in v):
            raise ValueError("`messages` has no text")
        return v

    def check_supported(self) -> None:
        if self.tools:
            raise UnsupportedError("tools", "tool calling is not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise UnsupportedError("response_format", "only the text response format")
        if self.top_logprobs and not self.logprobs:
            raise UnsupportedError("top_logprobs", "needs `logprobs: true`")

    def rendered_messages(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for "system"; templates know "system".
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]

    def to_sampling_params(self, settings: Settings, index: int = 0) -> SamplingParams:
        limit = self.max_completion_tokens or self.max_tokens
        top_n = (self.top_logprobs or 0) if self.logprobs else 0
        return self.sampling_params(settings, limit, index, top_n)
