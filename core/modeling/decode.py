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
from typing import Any, TypedDict, Unpack

import torch
from transformers import DynamicCache

from core.modeling.detok import Detokenizer, StopFinder, special_ids
from core.modeling.kvcache import can_join, layers_kv, merge, trim
from core.modeling.packed import packed_step, supports_packed
from core.modeling.params import FinishReason, SamplingParams, TopToken
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


class BatchDecoder:
    """One batch, decoded a step at a time (`step`); `decode_batch` runs it to the end.

    `on_finish(row)` is called the moment a row finishes, so its caller is answered without
    waiting for the rest of the batch. `admit(n)` is asked between steps for up to `n` new
    rows to join the running batch (continuous batching), keeping at most `max_rows`
    (default: the initial number of rows) in flight; it may return none. Newcomers are
    prefilled in the same forward as the running rows' next step where the model allows it
    (`pack_joins`: default `supports_packed(model)`; packed.py), else on their own. Stepping
    lets one thread decode two batches in turn (a draining one and a new one after a swap).
    """

    @torch.inference_mode()
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        rows: list[Row],
        pad_id: int | None = None,
        admit: Callable[[int], list[Row]] | None = None,
        on_finish: Callable[[Row], None] | None = None,
        max_rows: int | None = None,
        pack_joins: bool | None = None,
    ) -> None:
        if not rows:
            raise ValueError("a batch needs at least one row")
        self.model, self.tokenizer = model, tokenizer
        self.admit, self.on_finish = admit, on_finish
        self.device = next(model.parameters()).device
        self.pad = pad_id if pad_id is not None else (tokenizer.pad_token_id or 0)
        self.stops = eos_ids(model, tokenizer)
        self.special = special_ids(tokenizer)
        self.cache_kw, _ = forward_kwargs(model)
        self.cache, self.mask, self.logits = _prefill(model, rows, self.pad, self.device)
        # Plain per-layer caches: rows can join, padding can be cut.
        self.plain = can_join(self.cache)
        self.joinable = admit is not None and self.plain
        self.packed = self.joinable and (
            pack_joins if pack_joins is not None else supports_packed(model)
        )
        self.active = list(rows)
        self.seen = [self._ids(r) for r in rows]
        self.max_rows = max_rows or len(rows)

    def _ids(self, r: Row) -> torch.Tensor:
        return torch.tensor(r.prompt_ids, dtype=torch.long, device=self.device)

    def _done(self, r: Row, reason: FinishReason | None = None) -> None:
        if reason is not None:
            _finish(r, self.tokenizer, reason)
        if self.on_finish is not None:
            self.on_finish(r)

    def _emit(self, r: Row, tok: int, lp: float) -> bool:
        """Hand the row's new token to its callback; False if the callback failed."""
        if r.on_token is None:
            return True
        try:
            r.on_token(tok, lp)
        except Exception as e:  # e.g. its client's loop is gone
            r.error = e
            return False
        return True

    def _choose(self) -> tuple[list[int], torch.Tensor]:
        """Choose every row's next token; finish the rows that end. Returns the rows kept
        (indices into `active`) and the chosen tokens."""
        active, logits = self.active, self.logits
        penalties = [r.params.repetition_penalty for r in active]
        if any(p not in (None, 1.0) for p in penalties):
            logits = logits.float().clone()
            apply_repetition_penalty(logits, self.seen, penalties)
        logits = _penalize(active, logits)
        chosen, lp, failed = _choose_rows(logits, active)
        chosen_list, lp_list = chosen.tolist(), lp.tolist()
        _note_extras(active, logits, chosen_list)
        keep: list[int] = []
        now = time.monotonic()
        for j, r in enumerate(active):
            if (err := failed.get(j) or aborted(r, now)) is not None:
                r.error = err
                self._done(r)
                continue
            tok, tok_lp = int(chosen_list[j]), float(lp_list[j])
            if tok in self.stops:
                r.eos_token, r.eos_logprob = tok, tok_lp
                self._emit(r, tok, tok_lp)
                self._done(r, "eos_token")
                continue
            r.generated.append(tok)
            r.logprobs.append(tok_lp)
            if not self._emit(r, tok, tok_lp):
                self._done(r)
                continue
            if r.params.repetition_penalty not in (None, 1.0):
                self.seen[j] = torch.cat([self.seen[j], chosen[j : j + 1]])
            if r.params.stop and _check_stop(r, self.tokenizer, self.special):
                self._done(r, "stop_sequence")
            elif len(r.generated) >= r.params.max_new_tokens:
                self._done(r, "length")
            else:
                keep.append(j)
        return keep, chosen

    @torch.inference_mode()
    def step(self) -> bool:
        """Choose one token for every row, let newcomers join, run the next forward.
        Returns False once no row is left (the batch is done)."""
        if not self.active:
            return False
        keep, chosen = self._choose()
        if len(keep) < len(self.active):
            idx = torch.tensor(keep, dtype=torch.long, device=self.device)
            self.cache.batch_select_indices(idx)
            self.mask, chosen = self.mask[idx], chosen[idx]
            if self.plain:
                self.mask = trim(self.cache, self.mask)
            self.active = [self.active[j] for j in keep]
            self.seen = [self.seen[j] for j in keep]
        room = self.max_rows - len(self.active)
        newcomers = self.admit(room) if self.joinable and self.admit is not None else []
        if not self.active and not newcomers:
            return False
        self._forward(chosen, newcomers)
        if newcomers:
            self.active += newcomers
            self.seen += [self._ids(r) for r in newcomers]
        return True

    def _forward(self, chosen: torch.Tensor, newcomers: list[Row]) -> None:
        model, cache = self.model, self.cache
        if self.active:
            self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], 1)
        if self.active and newcomers and self.packed:
            # One forward for the running rows and the newcomers' prompts (packed.py).
            positions = self.mask.sum(-1) - 1
            prompts = [r.prompt_ids for r in newcomers]
            self.logits, joined = packed_step(model, cache, self.mask, chosen, positions, prompts)
            self.mask = merge(cache, self.mask, joined.kv, joined.mask)
            return
        if self.active:
            out = model(
                input_ids=chosen[:, None],
                attention_mask=self.mask,
                position_ids=self.mask.sum(-1, keepdim=True) - 1,
                use_cache=True,
                **{self.cache_kw: cache},
            )
            self.logits = out.logits[:, -1, :]
        if newcomers:
            # Prefill the newcomers on their own, then append them to the running batch.
            new_cache, new_mask, new_logits = _prefill(model, newcomers, self.pad, self.device)
            if self.active:
                self.mask = merge(cache, self.mask, layers_kv(new_cache), new_mask)
                self.logits = torch.cat([self.logits, new_logits])
            else:
                self.cache, self.mask, self.logits = new_cache, new_mask, new_logits


class DecodeOptions(TypedDict, total=False):
    """`BatchDecoder`'s keyword arguments, as `decode_batch` passes them on."""

    pad_id: int | None
    admit: Callable[[int], list[Row]] | None
    on_finish: Callable[[Row], None] | None
    max_rows: int | None
    pack_joins: bool | None


def decode_batch(
    model: Any, tokenizer: Any, rows: list[Row], **options: Unpack[DecodeOptions]
) -> None:
    """Generate for every row in place until each has a finish_reason (`BatchDecoder`,
    run to the end; the same keyword arguments)."""
    if not rows:
        return
    batch = BatchDecoder(model, tokenizer, rows, **options)
    while batch.step():
        pass
