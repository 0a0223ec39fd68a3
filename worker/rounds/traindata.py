"""What the update trains on: ``train_data`` = mixed | real_only | real_only_matched.

Every mode runs the same round: generate and select run, and the real replay text is drawn
as ``mixed`` draws it (same seeded order), so a mode changes only what the update sees and
the token budgets can be compared within one round:

* ``mixed`` (the default): the selected samples (BOS + prompt + continuation) plus replay
  passages making ``replay_fraction`` of the tokens.
* ``real_only``: real train-split passages alone, as many tokens as ``mixed`` trains on of
  *real* text: the replay tokens plus the BOS + prompt tokens inside the selected samples
  (corpus prompts are excerpts of the train split). The question it answers: is the gain the
  self-generated continuations, or the real text that comes with them?
* ``real_only_matched``: real passages alone, as many tokens as ``mixed`` trains on in all
  (selected samples + replay): equal compute.

Real passages are taken in the replay draw's order (the replay passages first, then the next
ones), the last cut so the total is exact; a pool smaller than the budget is reused in
further shuffled passes. The generated valid split still early-stops the update in every mode.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from core import metric_names as mn
from worker.rounds.evaluate import encode_texts

__all__ = ["TrainData", "build_train_data", "real_ids"]

Ids = list[list[int]]
Mode = Literal["mixed", "real_only", "real_only_matched"]


@dataclass(frozen=True)
class TrainData:
    """The update's training rows and the round's token budgets (tokens = ids in the rows)."""

    mode: str
    rows: Ids  # what the update trains on
    real: Ids  # the real-text rows among them (the KL anchor's rows)
    real_tokens: int  # real-text tokens trained on
    synthetic_tokens: int  # selected-sample tokens trained on (0 in the real_only modes)
    replay_tokens: int  # the replay draw's tokens (what mixed trains on of replay)
    selected_tokens: int  # tokens of the selected train samples (what mixed trains on of them)
    prompt_tokens: int  # the BOS + prompt part of selected_tokens

    def metrics(self) -> dict[str, float]:
        return {
            mn.REAL_TOKENS: self.real_tokens,
            mn.SYNTHETIC_TOKENS: self.synthetic_tokens,
            mn.REPLAY_TOKENS: self.replay_tokens,
            mn.SELECTED_TOKENS: self.selected_tokens,
            mn.PROMPT_TOKENS: self.prompt_tokens,
            mn.REAL_TOKEN_FRACTION: self.real_tokens
            / max(1, self.real_tokens + self.synthetic_tokens),
        }


def real_ids(
    pool: Sequence[str], tokenizer: Any, target: int, max_length: int, rng: random.Random
) -> Ids:
    """Real passages (``pool`` shuffled with ``rng`` exactly as :func:`replay_ids` does),
    each cut to ``max_length``, until they hold ``target`` tokens; the last one is cut so the
    total is exact. Further shuffled passes when one pass is too short."""
    out: Ids = []
    if target <= 0 or not pool:
        return out
    encoded = encode_texts(tokenizer, list(pool))
    got = 0
    order = list(range(len(encoded)))
    while got < target:
        rng.shuffle(order)
        before = got
        for i in order:
            ids = encoded[i][:max_length][: target - got]
            if target - got - len(ids) == 1 and len(ids) > 2:
                ids = ids[:-1]  # leave two ids for the next row rather than an unusable one
            if len(ids) < 2:  # nothing to predict; a one-id row trains nothing
                if target - got < 2:
                    return out
                continue
            out.append(ids)
            got += len(ids)
            if got >= target:
                break
        if got == before:
            break
    return out


def build_train_data(
    mode: Mode,
    pool: Sequence[str],
    tokenizer: Any,
    selected: Ids,
    prompt_tokens: int,
    replay_fraction: float,
    max_length: int,
    rng: random.Random,
) -> TrainData:
    """The rows and budgets of ``mode`` (see the module docstring). ``pool`` is the train
    split's passages in document order; ``prompt_tokens`` the BOS + prompt tokens inside
    ``selected``."""
    selected_tokens = sum(len(x) for x in selected)
    if mode == "mixed":
        replay, got = replay_ids(list(pool), tokenizer, selected, replay_fraction, max_length, rng)
        return TrainData(
            mode, selected + replay, replay, got, selected_tokens, got, selected_tokens,
            prompt_tokens,
        )  # fmt: skip
    # The replay draw as mixed makes it (same rng use), for its token count only.
    probe_rng = random.Random()
    probe_rng.setstate(rng.getstate())
    _, replay_got = replay_ids(
        list(pool), tokenizer, selected, replay_fraction, max_length, probe_rng
    )
    extra = prompt_tokens if mode == "real_only" else selected_tokens
    rows = real_ids(pool, tokenizer, replay_got + extra, max_length, rng)
    real = sum(len(x) for x in rows)
    return TrainData(
        mode, rows, rows, real, 0, replay_got, selected_tokens, prompt_tokens
    )  # fmt: skip


def replay_ids(
    pool: list[str],
    tokenizer: Any,
    train_ids: Sequence[Sequence[int]],
    fraction: float,
    max_length: int,
    rng: random.Random,
) -> tuple[list[list[int]], int]:
    """Real passages from ``pool`` (shuffled with ``rng``), as ids cut to ``max_length``,
    until they make ``fraction`` of all training tokens. Returns the ids and their tokens."""
    if fraction <= 0:
        return [], 0
    synth = sum(len(x) for x in train_ids)
    target = synth * fraction / (1 - fraction)
    pool = list(pool)
    rng.shuffle(pool)
    out: list[list[int]] = []
    got = 0
    for ids in encode_texts(tokenizer, pool):
        if got >= target:
            break
        out.append(ids[:max_length])
        got += len(out[-1])
    return out, got
