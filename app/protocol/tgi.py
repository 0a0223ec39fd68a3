"""Text Generation Inference's schema: `/generate`, `/generate_stream`, `POST /`, `/tokenize`.

Every field of TGI's `GenerateParameters` is accepted; null means the default. Values that
cannot be honored (a grammar, watermarking, a LoRA adapter) are refused by name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from app.protocol.common import (
    MIN_TEMPERATURE,
    Penalty,
    Probability,
    RepetitionPenalty,
    Seed,
    Strict,
    Temperature,
    TopK,
    UnsupportedError,
)
from core.modeling.params import SamplingParams
from core.settings import Settings

MAX_TOP_N_TOKENS = 5  # TGI's --max-top-n-tokens default


class GenerateParameters(Strict):
    adapter_id: str | None = None
    best_of: int | None = Field(default=None, gt=0)
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: Penalty | None = None
    grammar: dict[str, Any] | None = None
    max_new_tokens: int | None = Field(default=None, gt=0)
    repetition_penalty: RepetitionPenalty | None = None
    return_full_text: bool | None = False
    seed: Seed | None = None
    stop: list[str] | None = Field(default=None)
    temperature: Temperature | None = None
    top_k: TopK | None = None
    top_n_tokens: int | None = Field(default=None, ge=0, le=MAX_TOP_N_TOKENS)
    top_p: Probability | None = None
    truncate: int | None = Field(default=None, gt=0)
    typical_p: Probability | None = None
    watermark: bool = False

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float | None) -> float | None:
        if v is not None and v < MIN_TEMPERATURE:
            raise ValueError(
                f"`temperature` must be >= {MIN_TEMPERATURE} (use do_sample=false for greedy)"
            )
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str] | None) -> list[str] | None:
        if v and any(s == "" for s in v):
            raise ValueError("`stop` sequences must be non-empty strings")
        return v

    @property
    def sampling(self) -> bool:
        # As TGI: any sampling warper turns sampling on even without do_sample.
        return (
            self.do_sample
            or (self.temperature is not None and self.temperature != 1.0)
            or self.top_k is not None
            or (self.top_p is not None and self.top_p < 1.0)
            or (self.typical_p is not None and self.typical_p < 1.0)
        )

    def check_supported(self, settings: Settings, stream: bool) -> None:
        """Raise UnsupportedError for a valid value this server cannot honor."""
        if self.grammar is not None:
            raise UnsupportedError("grammar", "constrained decoding is not supported")
        if self.watermark:
            raise UnsupportedError("watermark", "watermarking is not supported")
        if self.adapter_id:
            raise UnsupportedError("adapter_id", "no LoRA adapters are served")
        best_of = self.best_of or 1
        if best_of > 1:
            if best_of > settings.max_best_of:
                raise UnsupportedError(
                    "best_of", f"must be <= {settings.max_best_of}. Given: {best_of}"
                )
            if not self.sampling:
                raise UnsupportedError("best_of", "best_of > 1 is not allowed for greedy decoding")
            if stream:
                raise UnsupportedError("best_of", "best_of > 1 is not supported when streaming")
        if stream and self.decoder_input_details:
            raise UnsupportedError(
                "decoder_input_details", "decoder_input_details is not supported when streaming"
            )

    def to_sampling_params(self, settings: Settings, index: int = 0) -> SamplingParams:
        max_new = self.max_new_tokens or settings.default_max_new_tokens
        if max_new > settings.max_new_tokens_limit:
            raise UnsupportedError(
                "max_new_tokens", f"must be <= {settings.max_new_tokens_limit}. Given: {max_new}"
            )
        stop = self.stop or []
        if len(stop) > settings.max_stop_sequences:
            raise UnsupportedError(
                "stop",
                f"supports up to {settings.max_stop_sequences} stop sequences. Given: {len(stop)}",
            )
        sample = self.sampling
        seed = self.seed
        if seed is not None and index:
            seed = (seed + index) % (2**63)  # best_of: distinct, reproducible draws
        return SamplingParams(
            max_new_tokens=max_new,
            do_sample=sample,
            temperature=self.temperature if self.temperature is not None else 1.0,
            top_k=self.top_k,
            top_p=self.top_p,
            typical_p=self.typical_p,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty or None,
            seed=seed,
            stop=tuple(stop),
            truncate=self.truncate,
            top_n_tokens=self.top_n_tokens or 0,
        )


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


class CompatGenerateRequest(GenerateRequest):
    """`POST /`: TGI's alias, which streams when the body says so."""

    stream: bool = False


class TokenizeRequest(Strict):
    inputs: str
    parameters: GenerateParameters | None = None


class Token(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] = Field(default_factory=list)


class Details(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] = Field(default_factory=list)
    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(BaseModel):
    index: int
    token: Token
    top_tokens: list[Token] = Field(default_factory=list)
    generated_text: str | None = None
    details: StreamDetails | None = None


class SimpleToken(BaseModel):
    id: int
    text: str
    start: int
    stop: int
