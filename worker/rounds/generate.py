"""Generate stage: batched sampling from the champion, seed recorded."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core.modeling.decode import Row, decode_batch
from core.modeling.params import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generated:
    prompt: str
    text: str  # the continuation only
    prompt_ids: list[int]
    ids: list[int]  # continuation token ids (kept so later stages need not re-tokenise)


@dataclass(frozen=True)
class GenerateResult:
    samples: list[Generated]
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def generate_samples(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    batch_size: int = 16,
    on_token: Callable[[int, int], None] | None = None,
) -> GenerateResult:
    """K samples per prompt. Row i gets seed `seed + i`, so the round is reproducible
    whatever the batch size. ``on_token(done, planned)`` is called as each token is chosen:
    tokens generated so far of the planned ``rows × max_new_tokens``."""
    rows: list[tuple[str, Row]] = []
    for p_idx, prompt in enumerate(prompts):
        ids: list[int] = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        for k in range(samples_per_prompt):
            params = SamplingParams(
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                top_p=top_p if top_p < 1.0 else None,
                seed=seed + p_idx * samples_per_prompt + k,
            )
            rows.append((prompt, Row(prompt_ids=ids, params=params)))
    if on_token is not None:
        planned = len(rows) * max_new_tokens
        count = [0]

        def tick(_tok: int, _lp: float) -> None:
            count[0] += 1
            on_token(count[0], planned)

        for _, row in rows:
            row.on_token = tick
    # Similar prompt lengths together waste less padding.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][1].prompt_ids))
    start = time.perf_counter()
    model.eval()
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            decode_batch(model, tokenizer, [rows[i][1] for i in order[b : b + batch_size]])
    seconds = time.perf_counter() - start
    samples = [
        Generated(prompt=p, text=r.text, prompt_ids=r.prompt_ids, ids=list(r.generated))
        for p, r in rows
    ]
    tokens = sum(len(s.ids) for s in samples)
    log.info("generated %d samples, %d tokens in %.1fs", len(samples), tokens, seconds)
    return GenerateResult(samples=samples, tokens=tokens, seconds=seconds)
