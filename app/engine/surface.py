"""What the TGI and OpenAI surfaces ask of the served checkpoint beyond generation:
tokenizing with offsets, naming token ids, prompt log-probabilities, chat templates.

Plain functions of the model and tokenizer the engine serves (the engine's methods pass
the current ones), kept apart from the batching thread.
"""

from __future__ import annotations

from typing import Any

from app.engine.interface import EngineValidationError, PromptDetails
from core.modeling.details import prompt_logprobs
from core.modeling.params import TokenInfo


def tokenize(tok: Any, text: str) -> list[tuple[int, str, int, int]]:
    """(id, text, start, stop) per token, offsets into `text`."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return [
        (int(i), text[a:b], int(a), int(b))
        for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]


def decode_tokens(tok: Any, ids: list[int]) -> dict[int, str]:
    return {i: tok.decode([i], skip_special_tokens=False) for i in ids}


def prompt_details(model: Any, tok: Any, ids: list[int], top_n: int) -> PromptDetails:
    """Prompt tokens with their log-probabilities (the first has none: NaN, sent as null)."""
    lps, tops = prompt_logprobs(model, ids, top_n)
    special = set(tok.all_special_ids)
    out: list[TokenInfo] = []
    done: list[int] = []
    text = ""
    for t, lp, top in zip(ids, lps, tops, strict=True):
        done.append(t)
        full = tok.decode(done, skip_special_tokens=False)
        piece, text = full[len(text) :], full
        out.append(
            TokenInfo(
                id=t,
                text=piece,
                logprob=lp if lp is not None else float("nan"),
                special=t in special,
                top=top,
            )
        )
    return PromptDetails(tokens=out)


def chat_prompt(tok: Any, messages: list[dict[str, str]]) -> str:
    """Chat messages rendered with the checkpoint's chat template, ready for generation."""
    if not getattr(tok, "chat_template", None):
        raise EngineValidationError("the served checkpoint has no chat template")
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template may refuse a conversation (e.g. role order)
        raise EngineValidationError(f"chat template: {e}") from e
    return str(text)
