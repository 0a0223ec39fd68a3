"""What a decoding request asks for and what each generated token carries (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["length", "eos_token", "stop_sequence"]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    truncate: int | None = None
    # Features of the TGI and OpenAI surfaces (None / 0: off).
    typical_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    top_n_tokens: int = 0


@dataclass(frozen=True)
class TokenInfo:
    id: int
    text: str
    logprob: float
    special: bool
    # The `top_n_tokens` most likely alternatives at this step (empty unless asked for).
    top: tuple[TopToken, ...] = ()


@dataclass(frozen=True)
class TopToken:
    id: int
    logprob: float
