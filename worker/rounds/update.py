"""Update step of a round: fine-tune a copy of the champion, early-stopped on valid loss.

The caller hands in a copy of the champion (the serving engine keeps the original) and the
already mixed training texts (selected samples plus real replay text). Sequences are
encoded, windowed and scored with exactly the conventions of :mod:`worker.rounds.evaluate`,
so the valid loss here and the perplexities of the evaluate stage measure the same thing.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from core.malloc import trim
from worker.rounds.anchor import Anchor
from worker.rounds.evaluate import (
    TextsOrIds,
    collate,
    encode_texts,
    length_batches,
    model_device,
    nll_terms,
    pad_id_of,
    score_sequences,
    split_windows,
)
from worker.rounds.metastep import state_copy
from worker.rounds.train_modes import (
    AUTOCAST_MODES,
    autocast_context,
    autocast_dtype,
    checkpointing,
)
from worker.rounds.weights_file import load_into, release, spill

__all__ = [
    "EpochStats",
    "TrainConfig",
    "TrainResult",
    "finetune",
    "train_loss",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 5e-5
    epochs: int = 2
    batch_size: int = 8
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0  # 0 or less disables clipping
    weight_decay: float = 0.0
    max_length: int = 256
    patience: int = 1
    autocast: str = "auto"  # auto | bf16 | off
    seed: int = 0
    # Rows of a batch go through forward/backward in slices of at most this many (padded)
    # tokens, their gradients summed: the same step, with the activations of a slice
    # instead of the whole batch in memory. 0: the whole batch at once.
    micro_batch_tokens: int = 0
    # Where the best epoch's weights wait while later epochs train (a scratch safetensors
    # file, deleted afterwards); None: in RAM, which costs one more copy of the model.
    spill_dir: str | None = None
    # Activation checkpointing while training (where the architecture supports it): each
    # decoder layer keeps only its input and recomputes the rest during backward. Costs a
    # second forward's matmuls; saves nearly all of a micro-batch's activations.
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        # Fail before a round has spent minutes generating data.
        if self.autocast not in AUTOCAST_MODES:
            raise ValueError(f"autocast must be one of {AUTOCAST_MODES}, not {self.autocast!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("epochs, batch_size and patience must be at least 1")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError("warmup_ratio must be in [0, 1)")
        if self.learning_rate <= 0.0 or self.weight_decay < 0.0:
            raise ValueError("learning_rate must be positive and weight_decay non-negative")
        if self.max_length < 2:
            raise ValueError("max_length must be at least 2")
        if self.micro_batch_tokens < 0:
            raise ValueError("micro_batch_tokens must be non-negative")


@dataclass
class EpochStats:
    """``train_loss`` and ``valid_loss`` are token-weighted mean NLL (nats per token);
    ``seconds`` covers the epoch's training steps and its validation."""

    epoch: int
    train_loss: float
    valid_loss: float | None
    tokens: int
    seconds: float


@dataclass
class TrainResult:
    """``tokens_per_s`` is trained tokens over time spent in training steps only."""

    epochs: list[EpochStats]
    best_epoch: int
    stopped_early: bool
    tokens_trained: int
    seconds: float
    tokens_per_s: float


def _lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        # Warmup starts at 1/warmup rather than 0 so the first step is not wasted.
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    # Biases and norm gains (1-D tensors) are not decayed: shrinking them toward zero
    # only distorts the activations' scale.
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _batches(
    windows: Sequence[list[int]], batch_size: int, rng: random.Random, epochs: int
) -> Iterator[list[list[list[int]]]]:
    """Per epoch, the length-bucketed batches in a seeded random order."""
    buckets = length_batches([len(w) for w in windows], batch_size)
    for _ in range(epochs):
        order = list(range(len(buckets)))
        rng.shuffle(order)
        yield [[windows[j] for j in buckets[b]] for b in order]


def micro_batches(batch: list[list[int]], max_tokens: int) -> list[list[list[int]]]:
    """``batch`` cut into consecutive slices whose padded size (rows × longest row) stays
    within ``max_tokens`` (one row at least); the whole batch when ``max_tokens`` is 0."""
    if max_tokens <= 0:
        return [batch]
    out: list[list[list[int]]] = []
    current: list[list[int]] = []
    width = 0
    for row in batch:
        w = max(width, len(row))
        if current and w * (len(current) + 1) > max_tokens:
            out.append(current)
            current, w = [], len(row)
        current.append(row)
        width = w
    if current:
        out.append(current)
    return out


def _running_loss(nll: torch.Tensor, tokens: int) -> float:
    return float(nll) / tokens


def _mean(nll: Sequence[float], counts: Sequence[int]) -> float | None:
    tokens = sum(counts)
    return math.fsum(nll) / tokens if tokens else None


@dataclass(frozen=True)
class TrainLoss:
    """``loss``: what one step backpropagates; ``row_nll``: each row's summed NLL (nats, no
    gradient) for the epoch's train loss."""

    loss: torch.Tensor
    row_nll: torch.Tensor


def train_loss(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, tokens: int
) -> TrainLoss:
    """The fine-tuning objective of one batch: token-weighted mean NLL over the batch's
    ``tokens`` predictions (length-bucketed batches differ in size, and a per-row mean would
    overweight short sequences). Another term of the objective is added here."""
    total, row_nll, _ = nll_terms(model, ids, mask, labels)
    return TrainLoss(loss=total / tokens, row_nll=row_nll)


def _keep(model: Any, cfg: TrainConfig, epoch: int) -> Mapping[str, torch.Tensor]:
    """The model's weights as they are now, in RAM or in a scratch file (``spill_dir``)."""
    if cfg.spill_dir is None:
        return state_copy(model)
    path = Path(cfg.spill_dir) / f".best-{os.getpid()}-{epoch}.safetensors"
    return spill(model, path)


def finetune(
    model: Any,
    tokenizer: Any,
    train: TextsOrIds,
    valid: TextsOrIds,
    cfg: TrainConfig,
    on_epoch: Callable[[EpochStats], None] | None = None,
    on_step: Callable[[int, int, Callable[[], float]], None] | None = None,
    anchor: Anchor | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place; return per-epoch statistics.

    ``on_step(step, planned_steps, running_loss)`` is called after every optimizer step;
    ``running_loss()`` is the epoch's token-weighted train loss so far (it syncs with the
    device, so call it only when the number is wanted).

    After each epoch the token-weighted valid loss is computed; the best state is kept on
    the CPU, training stops once valid loss has not improved for ``cfg.patience`` epochs,
    and the best state is restored at the end. With an empty ``valid`` there is no early
    stop and the last epoch's weights are kept. The model is left in eval mode.

    ``anchor`` (:mod:`worker.rounds.anchor`) adds its KL term on the batch's real-text rows.
    """
    with checkpointing(model, cfg.gradient_checkpointing):
        return _finetune(model, tokenizer, train, valid, cfg, on_epoch, on_step, anchor)


def _finetune(
    model: Any,
    tokenizer: Any,
    train: TextsOrIds,
    valid: TextsOrIds,
    cfg: TrainConfig,
    on_epoch: Callable[[EpochStats], None] | None = None,
    on_step: Callable[[int, int, Callable[[], float]], None] | None = None,
    anchor: Anchor | None = None,
) -> TrainResult:
    pad_id = pad_id_of(tokenizer)
    train_windows = [w for _, w in split_windows(encode_texts(tokenizer, train), cfg.max_length)]
    # A one-id window has nothing to predict; leaving it out keeps every step useful.
    train_windows = [w for w in train_windows if len(w) >= 2]
    if not train_windows:
        raise ValueError("nothing to train on: every training text is empty")
    valid_seqs = encode_texts(tokenizer, valid)

    device = model_device(model)
    amp = autocast_dtype(cfg.autocast, device)
    master = next(model.parameters()).dtype
    if master != torch.float32:
        # Master weights must stay float32: AdamW steps on bf16 weights round most updates
        # away. The caller owns the copy's dtype; say so rather than converting silently.
        log.warning("fine-tuning a %s model; expected float32 master weights", master)

    torch.manual_seed(cfg.seed)  # dropout, where the architecture has any
    rng = random.Random(cfg.seed)
    steps_per_epoch = math.ceil(len(train_windows) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = math.ceil(total_steps * cfg.warmup_ratio)
    # One fused kernel for the whole update on CUDA (a 135M model's step is launch-bound there).
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay),
        lr=cfg.learning_rate,
        fused=True if device.type == "cuda" else None,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup))
    trainable = [p for p in model.parameters() if p.requires_grad]
    log.info(
        "fine-tune: %d windows, %d steps (%d warmup), lr %g, autocast %s, device %s",
        len(train_windows),
        total_steps,
        warmup,
        cfg.learning_rate,
        amp,
        device,
    )

    history: list[EpochStats] = []
    best_loss = math.inf
    best_epoch = 0
    best_state: Mapping[str, torch.Tensor] | None = None
    stale = 0
    stopped_early = False
    tokens_trained = 0
    train_seconds = 0.0
    started = time.perf_counter()
    step = 0

    for epoch, batches in enumerate(_batches(train_windows, cfg.batch_size, rng, cfg.epochs), 1):
        epoch_start = time.perf_counter()
        model.train()
        # Accumulated on the device: no host sync per step, so a GPU never waits on Python.
        epoch_nll_t = torch.zeros((), dtype=torch.float64, device=device)
        epoch_tokens = 0
        for batch in batches:
            count = sum(max(0, len(w) - 1) for w in batch)  # = the labels nll_terms predicts
            optimizer.zero_grad(set_to_none=True)
            for part in micro_batches(batch, cfg.micro_batch_tokens):
                ids, mask, labels = collate(part, pad_id, device)
                with autocast_context(device, amp):
                    out = train_loss(model, ids, mask, labels, count)
                    loss = out.loss
                    # The KL anchor's term on this micro-batch's real-text rows (same count).
                    kl = anchor.loss(model, part, count) if anchor is not None else None
                    if kl is not None:
                        loss = loss + kl
                loss.backward()  # type: ignore[no-untyped-call]
                # The micro-batch's freed activations and casts go back to the system: glibc
                # keeps them otherwise, and the next one's land elsewhere in the heap (bf16
                # autocast on a CPU: update peak 3593 -> 3322 MiB on the bundled model).
                if device.type == "cpu":
                    trim()
                epoch_nll_t += out.row_nll.double().sum()
                del out
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            epoch_tokens += count
            step += 1
            if on_step is not None:
                on_step(step, total_steps, partial(_running_loss, epoch_nll_t, epoch_tokens))
        epoch_nll = float(epoch_nll_t)
        tokens_trained += epoch_tokens
        train_seconds += time.perf_counter() - epoch_start

        valid_loss: float | None = None
        if valid_seqs:
            nll, counts = score_sequences(model, valid_seqs, pad_id, cfg.batch_size, cfg.max_length)
            valid_loss = _mean(nll, counts)
        stats = EpochStats(
            epoch=epoch,
            train_loss=epoch_nll / epoch_tokens,
            valid_loss=valid_loss,
            tokens=epoch_tokens,
            seconds=time.perf_counter() - epoch_start,
        )
        history.append(stats)
        log.info(
            "epoch %d: train %.4f valid %s (%d tokens, %.1fs)",
            epoch,
            stats.train_loss,
            "n/a" if valid_loss is None else f"{valid_loss:.4f}",
            epoch_tokens,
            stats.seconds,
        )
        if on_epoch is not None:
            on_epoch(stats)

        if valid_loss is None:
            best_epoch = epoch
            continue
        if valid_loss < best_loss:
            best_loss, best_epoch, stale = valid_loss, epoch, 0
            # Skip the copy on the last epoch: if it is the best, the model already holds it.
            if best_state is not None:
                release(best_state)
            best_state = _keep(model, cfg, epoch) if epoch < cfg.epochs else None
        else:
            stale += 1
            if stale >= cfg.patience:
                stopped_early = epoch < cfg.epochs
                break

    # The optimizer's moments and the last step's gradients go now, not when the caller
    # drops the model: the rest of a round needs that memory.
    del optimizer, scheduler
    model.zero_grad(set_to_none=True)
    trim()
    if best_epoch != history[-1].epoch and best_state is not None:
        log.info("restoring epoch %d (valid loss %.4f)", best_epoch, best_loss)
        load_into(model, best_state)
    if best_state is not None:
        release(best_state)
    model.eval()
    seconds = time.perf_counter() - started
    return TrainResult(
        epochs=history,
        best_epoch=best_epoch,
        stopped_early=stopped_early,
        tokens_trained=tokens_trained,
        seconds=seconds,
        tokens_per_s=tokens_trained / train_seconds if train_seconds > 0 else 0.0,
    )
