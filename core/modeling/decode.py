"""Batched decoding with a KV cache for rows that each carry their own parameters.

Used by the serving engine and by a round's generate stage. Prompts are left-padded; a row
that finishes (EOS, stop sequence, length) leaves the batch at once, so it neither costs
compute nor waits for the longest row.
"""

from __future__ import annotations

import inspect
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from core.modeling.detok import Detokenizer, StopFinder, special_ids
from core.modeling.packed import packed_step, supports_packed
from core.modeling.params import FinishReason, SamplingParams, TokenInfo, TopToken
from core.modeling.sampling import (
    apply_frequency_presence,
    apply_repetition_penalty,
    choose_next,
    top_alternatives,
)

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
    # Set from any thread: the row leaves the batch at the next step (its client went away).
    cancelled: bool = False
    # time.monotonic() after which the row leaves the batch with RowDeadlineError.
    deadline: float | None = None
    # Why the row stopped without a finish_reason (its own failure, cancel, deadline); its
    # neighbours in the batch are not affected.
    error: BaseException | None = None
    # The EOS token that ended the row (TGI reports it as a special token; not in `generated`).
    eos_token: int | None = None
    eos_logprob: float = 0.0
    # Per generated step (and the EOS step), the `top_n_tokens` alternatives when asked for.
    tops: list[tuple[TopToken, ...]] = field(default_factory=list)
    # Rows with stop sequences: their text so far, decoded and searched token by token.
    detok: Detokenizer | None = field(default=None, repr=False)
    stop_finder: StopFinder | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.params.do_sample:
            # TGI reports the seed it used; pick one when the client gave none.
            self.seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
            self.generator = torch.Generator().manual_seed(self.seed)


class RowCancelledError(Exception):
    """The row was cancelled (its client went away)."""


class RowDeadlineError(Exception):
    """The row's deadline passed before it finished."""


def aborted(row: Row, now: float) -> BaseException | None:
    """Why `row` should leave its batch now (cancelled, past its deadline), or None."""
    if row.cancelled:
        return RowCancelledError("cancelled")
    if row.deadline is not None and now > row.deadline:
        return RowDeadlineError("deadline exceeded")
    return None


def _choose_rows(
    logits: torch.Tensor, rows: list[Row]
) -> tuple[torch.Tensor, torch.Tensor, dict[int, BaseException]]:
    """choose_next for the batch; if that fails, row by row, so a row whose parameters
    cannot be sampled fails alone. Generator states are restored first: the healthy rows
    draw exactly what they would have drawn in the batch (and alone)."""
    params, gens = [r.params for r in rows], [r.generator for r in rows]
    states = [g.get_state() if g is not None else None for g in gens]
    try:
        chosen, lp = choose_next(logits, params, gens)
        return chosen, lp, {}
    except Exception:  # isolated below, row by row
        log.warning("sampling failed for the batch; retrying row by row", exc_info=True)
    failed: dict[int, BaseException] = {}
    chosen = torch.zeros(len(rows), dtype=torch.long, device=logits.device)
    lp = torch.zeros(len(rows), dtype=torch.float32, device=logits.device)
    for j, (g, state) in enumerate(zip(gens, states, strict=True)):
        if g is not None and state is not None:
            g.set_state(state)
        try:
            one, one_lp = choose_next(logits[j : j + 1], [params[j]], [g])
            chosen[j], lp[j] = one[0], one_lp[0]
        except Exception as e:  # this row fails, not its neighbours
            failed[j] = e
    return chosen, lp, failed


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


def _check_stop(row: Row, tokenizer: Any, special: frozenset[int]) -> bool:
    """Whether the row's newest token completed a stop sequence (constant work per token:
    core/modeling/detok.py)."""
    if row.detok is None or row.stop_finder is None:
        row.detok, row.stop_finder = Detokenizer(tokenizer, special), StopFinder(row.params.stop)
    return row.stop_finder.feed(row.detok.push(row.generated[-1]))


def _note_extras(rows: list[Row], logits: torch.Tensor, chosen: list[int]) -> None:
    """Top-n alternatives per row that asked for them (off the common path)."""
    wanted = [i for i, r in enumerate(rows) if r.params.top_n_tokens > 0]
    if not wanted:
        return
    n = max(rows[i].params.top_n_tokens for i in wanted)
    ids, lps = top_alternatives(logits[wanted], n)
    for j, i in enumerate(wanted):
        k = rows[i].params.top_n_tokens
        rows[i].tops.append(
            tuple(TopToken(id=t, logprob=lp) for t, lp in zip(ids[j][:k], lps[j][:k], strict=True))
        )


def _penalize(rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
    """OpenAI's frequency / presence penalties (a copy of the logits when any row has one)."""
    freq = [r.params.frequency_penalty for r in rows]
    pres = [r.params.presence_penalty for r in rows]
    if not any(freq) and not any(pres):
        return logits
    logits = logits.float().clone()
    apply_frequency_presence(logits, [r.generated for r in rows], freq, pres)
    return logits


def _finish(row: Row, tokenizer: Any, reason: FinishReason) -> None:
    # One full decode per row, at its end. As TGI: a row stopped by a stop sequence keeps
    # the whole decoded text, so the generated tokens add up to generated_text.
    row.finish_reason = reason
    row.text = tokenizer.decode(row.generated, skip_special_tokens=True)


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _trim(cache: DynamicCache, mask: torch.Tensor) -> torch.Tensor:
    """Drop the left columns no row attends to any more (the padding of rows that left),
    so the batch's width follows its rows, not the longest row it ever held. Positions come
    from the mask, so they do not move. Returns the trimmed mask."""
    used = mask.any(0)
    first = int(used.int().argmax()) if bool(used.any()) else 0
    if first == 0:
        return mask
    for layer in cache.layers:
        assert isinstance(layer, DynamicLayer)
        assert layer.keys is not None and layer.values is not None
        layer.keys = layer.keys[:, :, first:]
        layer.values = layer.values[:, :, first:]
    return mask[:, first:]


def can_join(cache: DynamicCache) -> bool:
    """Rows can join a running batch only with plain per-layer caches (no sliding window)."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _merge(
    cache: DynamicCache,
    mask: torch.Tensor,
    other: list[tuple[torch.Tensor, torch.Tensor]],
    other_mask: torch.Tensor,
) -> torch.Tensor:
    """Append rows to `cache` (in place): `other` holds their keys and values per layer.
    Returns the merged attention mask.

    Both are left-padded to the longer length; padded positions are masked out, and
    positions come from the mask, so every row keeps its own positions.
    """
    width = max(mask.shape[1], other_mask.shape[1])
    for layer, (keys, values) in zip(cache.layers, other, strict=True):
        # can_join() checked these are DynamicLayer: plain key/value tensors.
        assert isinstance(layer, DynamicLayer)
        assert layer.keys is not None and layer.values is not None
        layer.keys = torch.cat([_left_pad(layer.keys, width, 2), _left_pad(keys, width, 2)])
        layer.values = torch.cat([_left_pad(layer.values, width, 2), _left_pad(values, width, 2)])
    return torch.cat([_left_pad(mask, width, 1), _left_pad(other_mask, width, 1)])


def _kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for layer in cache.layers:
        assert isinstance(layer, DynamicLayer)
        assert layer.keys is not None and layer.values is not None
        out.append((layer.keys, layer.values))
    return out


def _prefill(
    model: Any, rows: list[Row], pad: int, device: torch.device
) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
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
        extra["logits_to_keep"] = 1  # only the last position's logits are needed
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **extra)
    return cache, mask, out.logits[:, -1, :]


@torch.inference_mode()
def decode_batch(
    model: Any,
    tokenizer: Any,
    rows: list[Row],
    pad_id: int | None = None,
    admit: Callable[[int], list[Row]] | None = None,
    on_finish: Callable[[Row], None] | None = None,
    max_rows: int | None = None,
    pack_joins: bool | None = None,
) -> None:
    """Generate for every row in place until each has a finish_reason.

    `on_finish(row)` is called the moment a row finishes, so its caller is answered without
    waiting for the rest of the batch. `admit(n)` is asked between steps for up to `n` new
    rows to join the running batch (continuous batching), keeping at most `max_rows`
    (default: the initial number of rows) in flight; it may return none. Newcomers are
    prefilled in the same forward as the running rows' next step where the model allows it
    (`pack_joins`: default `supports_packed(model)`; packed.py), else on their own.
    """
    if not rows:
        return
    device = next(model.parameters()).device
    pad = pad_id if pad_id is not None else (tokenizer.pad_token_id or 0)
    stops = eos_ids(model, tokenizer)
    special = special_ids(tokenizer)
    cache_kw, _ = forward_kwargs(model)
    cache, mask, logits = _prefill(model, rows, pad, device)
    plain = can_join(cache)  # plain per-layer caches: rows can join, padding can be cut
    joinable = admit is not None and plain
    packed = joinable and (pack_joins if pack_joins is not None else supports_packed(model))
    active = list(rows)
    seen = [torch.tensor(r.prompt_ids, dtype=torch.long, device=device) for r in rows]
    max_rows = max_rows or len(rows)

    def done(r: Row, reason: FinishReason | None = None) -> None:
        if reason is not None:
            _finish(r, tokenizer, reason)
        if on_finish is not None:
            on_finish(r)

    while active:
        penalties = [r.params.repetition_penalty for r in active]
        if any(p not in (None, 1.0) for p in penalties):
            logits = logits.float().clone()
            apply_repetition_penalty(logits, seen, penalties)
        logits = _penalize(active, logits)
        chosen, lp, failed = _choose_rows(logits, active)
        chosen_list = chosen.tolist()
        lp_list = lp.tolist()
        _note_extras(active, logits, chosen_list)
        keep: list[int] = []
        now = time.monotonic()
        for j, r in enumerate(active):
            if (err := failed.get(j) or aborted(r, now)) is not None:
                r.error = err
                done(r)
                continue
            tok = int(chosen_list[j])
            if tok in stops:
                r.eos_token, r.eos_logprob = tok, float(lp_list[j])
                if r.on_token is not None:
                    try:
                        r.on_token(tok, float(lp_list[j]))
                    except Exception as e:  # e.g. its client's loop is gone
                        r.error = e
                done(r, "eos_token")
                continue
            r.generated.append(tok)
            r.logprobs.append(float(lp_list[j]))
            if r.on_token is not None:
                try:
                    r.on_token(tok, float(lp_list[j]))
                except Exception as e:  # e.g. its client's loop is gone
                    r.error = e
                    done(r)
                    continue
            if r.params.repetition_penalty not in (None, 1.0):
                seen[j] = torch.cat([seen[j], chosen[j : j + 1]])
            if r.params.stop and _check_stop(r, tokenizer, special):
                done(r, "stop_sequence")
            elif len(r.generated) >= r.params.max_new_tokens:
                done(r, "length")
            else:
                keep.append(j)
        if len(keep) < len(active):
            idx = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(idx)
            mask, chosen = mask[idx], chosen[idx]
            if plain:
                mask = _trim(cache, mask)
            active = [active[j] for j in keep]
            seen = [seen[j] for j in keep]
        newcomers = admit(max_rows - len(active)) if joinable and admit is not None else []
        if not active and not newcomers:
            break
        if active and newcomers and packed:
            # One forward for the running rows and the newcomers' prompts (packed.py).
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            positions = mask.sum(-1) - 1
            logits, joined = packed_step(
                model, cache, mask, chosen, positions, [r.prompt_ids for r in newcomers]
            )
            mask = _merge(cache, mask, joined.kv, joined.mask)
        else:
            if active:
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                positions = mask.sum(-1, keepdim=True) - 1
                out = model(
                    input_ids=chosen[:, None],
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    **{cache_kw: cache},
                )
                logits = out.logits[:, -1, :]
            if newcomers:
                # Prefill the newcomers on their own, then append them to the running batch.
                new_cache, new_mask, new_logits = _prefill(model, newcomers, pad, device)
                if active:
                    mask = _merge(cache, mask, _kv(new_cache), new_mask)
                    logits = torch.cat([logits, new_logits])
                else:
                    cache, mask, logits = new_cache, new_mask, new_logits
        if newcomers:
            active += newcomers
            seen += [torch.tensor(r.prompt_ids, dtype=torch.long, device=device) for r in newcomers]


def token_details(row: Row, tokenizer: Any) -> list[TokenInfo]:
    """Each generated token, then the EOS token that ended the row (TGI reports it, special).

    Texts are decoded incrementally (core/modeling/detok.py: linear in the length), so the
    non-special texts add up to the generated text even where one character spans several
    tokens: the token that completes a character carries it, the ones before carry "".
    """
    special = special_ids(tokenizer)
    ids = list(row.generated)
    lps = list(row.logprobs)
    if row.eos_token is not None:
        ids.append(row.eos_token)
        lps.append(row.eos_logprob)
    detok = Detokenizer(tokenizer, special)
    pieces: list[str] = []
    last = -1  # the last non-special token: it carries what is left at the end
    for k, t in enumerate(ids):
        if t in special:
            pieces.append(tokenizer.decode([t], skip_special_tokens=False))
        else:
            pieces.append(detok.push(t))
            last = k
    if last >= 0:
        pieces[last] += detok.flush()
    return [
        TokenInfo(
            id=t,
            text=piece,
            logprob=lp,
            special=t in special,
            top=row.tops[k] if k < len(row.tops) else (),
        )
        for k, (t, lp, piece) in enumerate(zip(ids, lps, pieces, strict=True))
    ]


@torch.inference_mode()
def prompt_logprobs(
    model: Any, ids: list[int], top_n: int = 0
) -> tuple[list[float | None], list[tuple[TopToken, ...]]]:
    """Log-probability of each prompt token given the ones before it (None for the first),
    and its `top_n` alternatives: TGI's `decoder_input_details`, OpenAI's `echo` logprobs."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    logp = model(input_ids=x).logits[0, :-1].float().log_softmax(-1)
    target = x[0, 1:]
    lps: list[float | None] = [None, *logp.gather(1, target[:, None])[:, 0].tolist()]
    tops: list[tuple[TopToken, ...]] = [()]
    if top_n > 0:
        vals, idx = logp.topk(top_n, dim=-1)
        tops += [
            tuple(TopToken(id=t, logprob=v) for t, v in zip(ti, vi, strict=True))
            for ti, vi in zip(idx.tolist(), vals.tolist(), strict=True)
        ]
    else:
        tops += [()] * (len(ids) - 1)
    return lps, tops
