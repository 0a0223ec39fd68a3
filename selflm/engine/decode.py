"""Batched decoding with a KV cache for rows that each carry their own parameters.

Used by the serving engine and by a round's generate stage. Prompts are left-padded; a row
that finishes (EOS, stop sequence, length) leaves the batch at once, so it neither costs
compute nor waits for the longest row.
"""

from __future__ import annotations

import inspect
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from selflm.engine.interface import FinishReason, SamplingParams, TokenInfo
from selflm.engine.sampling import apply_repetition_penalty, choose_next

log = logging.getLogger(__name__)


@dataclass
class Row:
    prompt_ids: list[int]
    params: SamplingParams
    want_tokens: bool = False
    seed: int | None = None
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = None
    # Called from the decoding thread with (token id, logprob) as each token is chosen.
    on_token: Callable[[int, float], None] | None = None

    def __post_init__(self) -> None:
        if self.params.do_sample:
            # TGI reports the seed it used; pick one when the client gave none.
            self.seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
            self.generator = torch.Generator().manual_seed(self.seed)


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config):
        value = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def forward_kwargs(model: Any) -> tuple[str, bool]:
    """The cache keyword (`cache` in transformers ≥ 5.2x, `past_key_values` before) and
    whether the model accepts `logits_to_keep` (skips the vocab projection of the prompt)."""
    params = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def _check_stop(row: Row, tokenizer: Any) -> bool:
    text = tokenizer.decode(row.generated, skip_special_tokens=True)
    cut = -1
    for s in row.params.stop:
        i = text.find(s)
        if i >= 0 and (cut < 0 or i + len(s) < cut):
            cut = i + len(s)
    if cut >= 0:
        # TGI keeps the stop sequence in generated_text and drops anything after it.
        row.text = text[:cut]
        return True
    return False


def _finish(row: Row, tokenizer: Any, reason: FinishReason) -> None:
    row.finish_reason = reason
    if reason != "stop_sequence":
        row.text = tokenizer.decode(row.generated, skip_special_tokens=True)


@torch.inference_mode()
def decode_batch(model: Any, tokenizer: Any, rows: list[Row], pad_id: int | None = None) -> None:
    """Generate for every row in place until each has a finish_reason."""
    if not rows:
        return
    device = next(model.parameters()).device
    pad = pad_id if pad_id is not None else (tokenizer.pad_token_id or 0)
    stops = eos_ids(model, tokenizer)
    width = max(len(r.prompt_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    cache_kw, has_keep = forward_kwargs(model)
    extra: dict[str, Any] = {cache_kw: cache, "use_cache": True}
    if has_keep:
        extra["logits_to_keep"] = 1
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **extra)
    logits = out.logits[:, -1, :]
    active = list(range(len(rows)))  # indices into `rows` of the rows still in the batch
    seen = [torch.tensor(r.prompt_ids, dtype=torch.long, device=device) for r in rows]
    while active:
        live = [rows[i] for i in active]
        penalties = [r.params.repetition_penalty for r in live]
        if any(p not in (None, 1.0) for p in penalties):
            logits = logits.float().clone()
            apply_repetition_penalty(logits, [seen[i] for i in active], penalties)
        chosen, lp = choose_next(logits, [r.params for r in live], [r.generator for r in live])
        chosen_list = chosen.tolist()
        lp_list = lp.tolist()
        keep: list[int] = []
        for j, i in enumerate(active):
            r = rows[i]
            tok = int(chosen_list[j])
            if tok in stops:
                _finish(r, tokenizer, "eos_token")
                continue
            r.generated.append(tok)
            r.logprobs.append(float(lp_list[j]))
            if r.on_token is not None:
                r.on_token(tok, float(lp_list[j]))
            if r.params.repetition_penalty not in (None, 1.0):
                seen[i] = torch.cat([seen[i], chosen[j : j + 1]])
            if r.params.stop and _check_stop(r, tokenizer):
                r.finish_reason = "stop_sequence"
            elif len(r.generated) >= r.params.max_new_tokens:
                _finish(r, tokenizer, "length")
            else:
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(active):
            idx = torch.tensor(keep, device=device)
            cache.batch_select_indices(idx)
            mask = mask[idx]
            chosen = chosen[idx]
            active = [active[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        positions = mask.sum(-1, keepdim=True) - 1
        out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=positions, **extra)
        logits = out.logits[:, -1, :]


def token_details(row: Row, tokenizer: Any) -> list[TokenInfo]:
    special = set(tokenizer.all_special_ids)
    return [
        TokenInfo(id=t, text=tokenizer.decode([t]), logprob=lp, special=t in special)
        for t, lp in zip(row.generated, row.logprobs, strict=True)
    ]
