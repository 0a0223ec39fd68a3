"""Token-weighted perplexity and per-sample loss of a causal LM.

Conventions shared with :mod:`worker.rounds.update` (which trains on exactly what this module
scores):

* Texts are encoded without the tokenizer's own special tokens and the tokenizer's BOS token,
  when it has one, is prepended. The first word is then a prediction like any other, so a
  one-word text still counts and texts of different lengths are scored alike. A sequence of
  n ids contributes n - 1 predictions.
* Pre-tokenized inputs (lists of ids) are used verbatim: produce them with
  :func:`encode_texts` to get the same numbers as for the strings, and encode once when the
  same set is scored by several models (a round scores its dev set for every ε).
* A sequence longer than ``max_length`` is cut into windows of ``max_length`` ids that
  overlap by one id, so every id after the first is still predicted exactly once (with the
  context reset at each window) and no text is silently truncated.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from worker.rounds.lm_loss import decoder_and_head, head_nll

__all__ = [
    "IGNORE_INDEX",
    "Perplexity",
    "TextsOrIds",
    "collate",
    "encode_texts",
    "length_batches",
    "model_device",
    "nll_terms",
    "pad_id_of",
    "per_sample_loss",
    "perplexity",
    "score_sequences",
    "split_windows",
    "token_nll",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value torch's cross_entropy skips
TextsOrIds = Sequence[str] | Sequence[list[int]]


@dataclass(frozen=True)
class Perplexity:
    """``nll``: summed negative log-likelihood in nats over ``tokens`` predictions;
    ``ppl = exp(nll / tokens)`` (token-weighted, not a mean of per-text perplexities)."""

    ppl: float
    nll: float
    tokens: int


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device  # type: ignore[no-any-return]


def pad_id_of(tokenizer: Any) -> int:
    # The pad id's value never reaches the loss (masked out, label -100); it only has to be
    # a valid embedding index.
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def encode_texts(tokenizer: Any, texts: TextsOrIds) -> list[list[int]]:
    """BOS + ids for each string; id lists are copied through unchanged."""
    items: list[str | list[int]] = list(texts)
    if all(isinstance(t, str) for t in items):
        if not items:
            return []
        ids: list[list[int]] = tokenizer(items, add_special_tokens=False)["input_ids"]
        bos = tokenizer.bos_token_id
        prefix = [int(bos)] if bos is not None else []
        return [prefix + list(row) for row in ids]
    if all(isinstance(t, list) for t in items):
        return [[int(i) for i in t] for t in items if isinstance(t, list)]
    raise TypeError("texts must be all strings or all lists of token ids")


def split_windows(seqs: Sequence[list[int]], max_length: int) -> list[tuple[int, list[int]]]:
    """``(source index, window)`` pairs; windows overlap by one id (see module docstring)."""
    if max_length < 2:
        raise ValueError("max_length must be at least 2 (one context id and one target)")
    out: list[tuple[int, list[int]]] = []
    for i, ids in enumerate(seqs):
        start = 0
        while True:
            out.append((i, ids[start : start + max_length]))
            if start + max_length >= len(ids):
                break
            start += max_length - 1
    return out


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, so padding wastes little compute."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(
    seqs: Sequence[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, labels)``; labels are -100 on padding.

    Right padding keeps every row's real ids at positions 0..n-1, so position ids need no
    correction and causal attention never lets a real id see a pad.
    """
    width = max((len(s) for s in seqs), default=0)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, ids in enumerate(seqs):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    # Labels come from the mask, not from comparing with pad_id: pad and EOS share an id in
    # many tokenizers, and a real EOS must still be predicted.
    labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
    return input_ids.to(device), mask.to(device), labels.to(device)


def nll_terms(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Σ NLL, per-row summed NLL, per-row predicted tokens)``, float32 nats.

    Only the first is differentiable (the one to train on). The LM head and the softmax run
    a few hundred positions at a time where the architecture allows (:mod:`.lm_loss`), so
    the batch's full [batch, length, vocabulary] logits never exist.
    """
    targets = labels[:, 1:]
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    if input_ids.shape[1] < 2:
        zeros = torch.zeros(input_ids.shape[0], device=input_ids.device)
        return zeros.sum(), zeros, counts
    split = decoder_and_head(model)
    if split is not None:
        decoder, weight = split
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        total, nll = head_nll(out.last_hidden_state[:, :-1, :], weight, targets)
        return total, nll.sum(dim=1), counts
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    # float32 for the softmax even under bf16 autocast: log-probs of a 49k vocabulary lose
    # most of their precision in bf16.
    logits = out.logits[:, :-1, :].float()
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(targets)
    rows = nll.sum(dim=1)
    return rows.sum(), rows.detach(), counts


def token_nll(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed NLL (float32, nats, no gradient) and per-row number of predicted
    tokens."""
    _, rows, counts = nll_terms(model, input_ids, attention_mask, labels)
    return rows, counts


def score_sequences(
    model: Any,
    seqs: Sequence[list[int]],
    pad_id: int,
    batch_size: int = 8,
    max_length: int = 256,
    on_batch: Callable[[float], None] | None = None,
) -> tuple[list[float], list[int]]:
    """Summed NLL and prediction count per sequence, in input order.

    ``on_batch(fraction)`` is called after each batch with the fraction of windows scored.

    Runs in eval mode under ``torch.inference_mode()`` on the model's device and puts the
    model back into the train/eval mode it had, so a training loop can call it mid-run.
    """
    # A window of fewer than two ids predicts nothing; an all-padding row could also give
    # NaN attention, so such windows never reach the model.
    windows = [(i, w) for i, w in split_windows(seqs, max_length) if len(w) >= 2]
    nll = [0.0] * len(seqs)
    counts = [0] * len(seqs)
    device = model_device(model)
    was_training = bool(model.training)
    scored = 0
    model.eval()
    try:
        with torch.inference_mode():
            for batch in length_batches([len(w) for _, w in windows], batch_size):
                ids, mask, labels = collate([windows[j][1] for j in batch], pad_id, device)
                row_nll, row_counts = token_nll(model, ids, mask, labels)
                for j, value, count in zip(
                    batch, row_nll.double().tolist(), row_counts.tolist(), strict=True
                ):
                    source = windows[j][0]
                    nll[source] += value
                    counts[source] += int(count)
                if on_batch is not None:
                    scored += len(batch)
                    on_batch(scored / len(windows))
    finally:
        model.train(was_training)
    return nll, counts


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def perplexity(
    model: Any,
    tokenizer: Any,
    texts: TextsOrIds,
    batch_size: int = 8,
    max_length: int = 256,
    on_batch: Callable[[float], None] | None = None,
) -> Perplexity:
    """Token-weighted perplexity of ``model`` on ``texts`` (strings or encoded id lists).

    Raises ``ValueError`` when the texts hold no prediction at all. ``on_batch``: see
    :func:`score_sequences`.
    """
    seqs = encode_texts(tokenizer, texts)
    nll, counts = score_sequences(
        model, seqs, pad_id_of(tokenizer), batch_size, max_length, on_batch
    )
    tokens = sum(counts)
    if tokens == 0:
        raise ValueError("no tokens to score: every text is empty")
    total = math.fsum(nll)
    result = Perplexity(ppl=_safe_exp(total / tokens), nll=total, tokens=tokens)
    log.debug("perplexity %.3f over %d tokens in %d texts", result.ppl, tokens, len(seqs))
    return result


def per_sample_loss(
    model: Any,
    tokenizer: Any,
    texts: TextsOrIds,
    batch_size: int = 8,
    max_length: int = 256,
    on_batch: Callable[[float], None] | None = None,
) -> list[float]:
    """Mean token NLL of each text, in input order; NaN for a text with no prediction."""
    seqs = encode_texts(tokenizer, texts)
    nll, counts = score_sequences(
        model, seqs, pad_id_of(tokenizer), batch_size, max_length, on_batch
    )
    return [v / c if c else math.nan for v, c in zip(nll, counts, strict=True)]
