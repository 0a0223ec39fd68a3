"""The first half of a round as stage functions: prepare, generate, select, update.

Each stage takes typed inputs and returns a frozen result that knows its own metrics
(``.metrics()``, names from :mod:`core.metric_names`); ``tick`` reports progress inside the
stage (see :mod:`worker.rounds.progress`). The algorithms live in their own modules
(:mod:`.generate`, :mod:`.select`, :mod:`.update` …); these functions only wire a round's
parameters into them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core import metric_names as mn
from core import registry
from core.db import rounds as records
from core.db.session import Database
from core.modeling.device import pick_device
from core.registry import CheckpointRef
from core.round_params import RoundParams
from core.settings import Settings
from worker.rounds import lora
from worker.rounds.anchor import Anchor, build_anchor
from worker.rounds.data import (
    SPLIT_SEED,
    Corpus,
    eval_sample,
    load_corpus,
    load_prompt_file,
    prompts_from,
    real_pool,
)
from worker.rounds.evaluate import encode_texts, per_sample_loss
from worker.rounds.generate import GenerateResult, generate_samples
from worker.rounds.metastep import state_copy
from worker.rounds.progress import Tick
from worker.rounds.select import FilterConfig, Sample, dedup, filter_degenerate, split_train_valid
from worker.rounds.select import select as pick
from worker.rounds.traindata import TrainData, build_train_data
from worker.rounds.update import EpochStats, TrainConfig, TrainResult, finetune
from worker.rounds.weights_file import FileWeights, compatible

log = logging.getLogger(__name__)

Ids = list[list[int]]


# --------------------------------------------------------------------------- prepare


# Micro-batch size of the update's forward/backward (see TrainConfig.micro_batch_tokens)
# and activation checkpointing: with both, a step's activations are one row's layer inputs
# and one layer's recomputation, not the whole batch's. What they save and cost on the
# bundled model is in docs/benchmarks.md ("Round memory").
MICRO_BATCH_TOKENS = 256
GRADIENT_CHECKPOINTING = True


@dataclass(frozen=True)
class Prepared:
    """The champion loaded in float32 (training autocasts where that is fast), the corpus,
    the real text the round draws prompts and replay from (``pool``: train-split passages,
    all or ``train_passages`` of them) and the held-out sets tokenised once: every
    perplexity of the round scores these ids.

    ``model`` is the round's one model: the update fine-tunes it in place. ``parent`` gives
    the champion's weights back afterwards, read from its verified files."""

    champion: CheckpointRef
    model: Any
    tokenizer: Any
    corpus: Corpus
    pool: list[str]
    dev: Ids
    test: Ids
    parent: Mapping[str, torch.Tensor]

    def metrics(self) -> dict[str, float]:
        return {
            mn.TRAIN_DOCS: len(self.corpus.train),
            mn.TRAIN_PASSAGES: len(self.pool),
            mn.DEV_DOCS: len(self.corpus.dev),
            mn.TEST_DOCS: len(self.corpus.test),
            mn.DEV_PASSAGES: len(self.dev),
            mn.TEST_PASSAGES: len(self.test),
        }


def parent_weights(champion: CheckpointRef, model: Any) -> Mapping[str, torch.Tensor]:
    """The champion's weights from its files (just verified by ``registry.open``), or a copy
    in RAM where the files' tensors do not map onto the model's state one to one."""
    try:
        files = FileWeights.of_checkpoint(Path(champion.path))
        if compatible(model, files):
            return files
    except (OSError, ValueError) as e:
        log.warning("champion files unreadable as weights (%s); keeping a copy in RAM", e)
    else:
        log.info("champion files do not map onto the model's state; keeping a copy in RAM")
    return state_copy(model)


def prepare(champion: CheckpointRef, settings: Settings, p: RoundParams) -> Prepared:
    loaded = registry.open(champion, pick_device(settings.device), torch.float32)
    parent = parent_weights(champion, loaded.model)
    tok = loaded.tokenizer
    if p.update_method == "lora":
        lora.resolve_targets(loaded.model, p)  # fail now, not after minutes of generation
    # A named corpus is read from the operator's round data directory only (datafiles).
    corpus = load_corpus(
        p.corpus,
        seed=SPLIT_SEED,
        root=settings.round_data_path,
        max_bytes=settings.round_data_max_bytes,
    )
    return Prepared(
        champion=champion,
        model=loaded.model,
        tokenizer=tok,
        corpus=corpus,
        pool=real_pool(corpus.train, p.train_passages),
        dev=encode_texts(tok, eval_sample(corpus.dev, p.eval_passages)),
        test=encode_texts(tok, eval_sample(corpus.test, p.eval_passages)),
        parent=parent,
    )


def round_prompts(
    db: Database, settings: Settings, p: RoundParams, pool: list[str], rng: random.Random
) -> list[str]:
    """The prompts the round samples from: given, from a file, served, or openings of the
    corpus passages in ``pool`` (:attr:`Prepared.pool`)."""
    if p.prompts:
        return [x for x in p.prompts if x.strip()]
    if p.prompt_source == "file":
        assert p.prompt_file is not None
        return load_prompt_file(
            settings.round_data_path, p.prompt_file, p.num_prompts, settings.round_data_max_bytes
        )
    if p.prompt_source == "served":
        served = records.served_prompts(db, settings.lineage, p.num_prompts)
        if served:
            return served
        log.info("no served prompts recorded; using the corpus")
    return prompts_from(pool, p.num_prompts, rng)


# --------------------------------------------------------------------------- generate


@dataclass(frozen=True)
class Generation:
    prompts: int
    result: GenerateResult
    seed: int

    def metrics(self) -> dict[str, float]:
        return {
            mn.PROMPTS: self.prompts,
            mn.GENERATED: len(self.result.samples),
            mn.TOKENS: self.result.tokens,
            mn.TOKENS_PER_S: self.result.tokens_per_s,
            mn.SEED: self.seed,
        }


def generate(model: Any, tok: Any, prompts: list[str], p: RoundParams, tick: Tick) -> Generation:
    """K samples per prompt from the champion; progress in tokens of the planned total."""
    result = generate_samples(
        model,
        tok,
        prompts,
        p.samples_per_prompt,
        p.max_new_tokens,
        p.temperature,
        p.top_p,
        p.seed,
        p.generate_batch_size,
        on_token=lambda done, planned: tick(done, planned, "tokens"),
    )
    return Generation(prompts=len(prompts), result=result, seed=p.seed)


# --------------------------------------------------------------------------- select


@dataclass(frozen=True)
class Selection:
    """The training and validation ids, as generated (BOS + prompt + continuation)."""

    generated: int
    filtered_degenerate: int
    dedup_exact: int
    dedup_near: int
    train: Ids
    valid: Ids
    prompt_tokens: int = 0  # BOS + prompt ids inside the train samples (traindata budgets)

    def metrics(self) -> dict[str, float]:
        return {
            mn.GENERATED: self.generated,
            mn.FILTERED_DEGENERATE: self.filtered_degenerate,
            mn.DEDUP_EXACT: self.dedup_exact,
            mn.DEDUP_NEAR: self.dedup_near,
            mn.SELECTED: len(self.train) + len(self.valid),
            mn.TRAIN: len(self.train),
            mn.VALID: len(self.valid),
        }


def select(
    model: Any, tok: Any, gen: Generation, p: RoundParams, rng: random.Random, tick: Tick
) -> Selection:
    """Filter, deduplicate, score (difficulty strategy) and pick; split train/valid."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    samples = [
        Sample(text=g.text, prompt=g.prompt, token_ids=tuple(bos + g.prompt_ids + g.ids))
        for g in gen.result.samples
    ]
    n_filtered = n_exact = n_near = 0
    if p.filters:
        cfg = FilterConfig(
            min_words=p.min_words,
            max_repetition=p.max_repetition,
            dedup_threshold=p.dedup_threshold,
        )
        samples, n_filtered = filter_degenerate(samples, cfg)
        samples, n_exact, n_near = dedup(samples, cfg)
    if p.strategy == "difficulty" and samples:
        n = len(samples)
        losses = per_sample_loss(
            model,
            tok,
            [list(s.token_ids) for s in samples],
            batch_size=p.batch_size,
            max_length=p.max_length,
            on_batch=lambda frac: tick(frac * n, n, "samples scored"),
        )
        samples = [
            Sample(text=s.text, prompt=s.prompt, loss=lo, token_ids=s.token_ids)
            for s, lo in zip(samples, losses, strict=True)
        ]
    chosen = pick(samples, p.train_size + p.valid_size, p.strategy, rng)
    if len(chosen) < 2:
        raise RuntimeError(f"only {len(chosen)} usable samples after selection")
    train_s, valid_s = split_train_valid(chosen, p.valid_size / (p.train_size + p.valid_size), rng)
    prompt_ids = {s.prompt: len(bos) + len(tok(s.prompt, add_special_tokens=False)["input_ids"])
                  for s in train_s}  # fmt: skip
    return Selection(
        generated=len(gen.result.samples),
        filtered_degenerate=n_filtered,
        dedup_exact=n_exact,
        dedup_near=n_near,
        train=[list(s.token_ids) for s in train_s],
        valid=[list(s.token_ids) for s in valid_s],
        prompt_tokens=sum(prompt_ids[s.prompt] for s in train_s),
    )


# --------------------------------------------------------------------------- update


@dataclass(frozen=True)
class Update:
    """The fine-tuned model (the round's model, changed in place: the champion's weights
    are in ``base_state``) and its statistics."""

    candidate: Any
    base_state: Mapping[str, torch.Tensor]
    train: TrainResult
    replay_fraction: float
    replay_texts: int
    replay_tokens: int
    synthetic_tokens: int
    data: TrainData | None = None
    anchor: dict[str, float] | None = None

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.replay_fraction > 0:
            out[mn.REPLAY_TOKENS] = self.replay_tokens
            out[mn.SYNTHETIC_TOKENS] = self.synthetic_tokens
            out[mn.REPLAY_TOKEN_FRACTION] = self.replay_tokens / max(
                1, self.replay_tokens + self.synthetic_tokens
            )
        out |= self.data.metrics() if self.data is not None else {}
        out |= self.anchor or {}
        return out | {
            mn.TOKENS_TRAINED: self.train.tokens_trained,
            mn.TOKENS_PER_S: self.train.tokens_per_s,
            mn.BEST_EPOCH: self.train.best_epoch,
            mn.STOPPED_EARLY: float(self.train.stopped_early),
            mn.REPLAY_TEXTS: self.replay_texts,
        }


def epoch_metrics(e: EpochStats) -> dict[str, float]:
    """One epoch's numbers, recorded with ``step = epoch``."""
    out = {mn.TRAIN_LOSS: e.train_loss, mn.TOKENS: float(e.tokens), mn.SECONDS: e.seconds}
    if e.valid_loss is not None:
        out[mn.VALID_LOSS] = e.valid_loss
    return out


def update(
    model: Any,
    tok: Any,
    pool: list[str],
    sel: Selection,
    p: RoundParams,
    rng: random.Random,
    tick: Tick,
    on_epoch: Callable[[EpochStats], None],
    parent: Mapping[str, torch.Tensor],
    spill_dir: Path | None = None,
    anchor_base: Callable[[], tuple[Any, int, bool]] | None = None,
) -> Update:
    """Fine-tune the champion's model in place on what ``p.train_data`` names
    (:mod:`.traindata`, real text from ``pool``; ``parent`` keeps the champion's weights);
    progress in optimizer steps of the planned total, with the epoch's running train loss.
    The best epoch's weights wait in ``spill_dir``. A LoRA round trains an adapter injected
    into the model and merges it (:mod:`.lora`): the candidate is the same plain model. With
    ``p.kl_anchor > 0``, ``anchor_base()`` gives the lineage base (:mod:`.anchor`)."""
    data = build_train_data(
        p.train_data,
        pool,
        tok,
        sel.train,
        sel.prompt_tokens,
        p.replay_fraction,
        p.max_length,
        rng,
    )
    anchor: Anchor | None = None
    anchor_start = 0.0
    if p.kl_anchor > 0 and anchor_base is not None and data.real:
        base, version, loaded = anchor_base()
        anchor = build_anchor(
            base, data.real, p.max_length, p.kl_anchor, p.kl_anchor_top_k, p.batch_size, version
        )
        del base  # a loaded base is freed before training starts
        anchor_start = anchor.mean_kl(model, p.batch_size) if loaded else 0.0
    # LoRA: peft injects the adapter into `model` in place; the meta-step's base stays
    # `parent` (the champion's files), whose delta is zero outside the adapted weights.
    trained = lora.wrap(model, p)[0] if p.update_method == "lora" else model
    cfg = TrainConfig(
        learning_rate=p.learning_rate,
        epochs=p.epochs,
        batch_size=p.batch_size,
        max_length=p.max_length,
        seed=p.seed,
        micro_batch_tokens=MICRO_BATCH_TOKENS,
        gradient_checkpointing=GRADIENT_CHECKPOINTING,
        spill_dir=str(spill_dir) if spill_dir is not None else None,
    )
    result = finetune(
        trained,
        tok,
        data.rows,
        sel.valid,
        cfg,
        on_epoch,
        on_step=lambda step, planned, loss: tick(
            step, planned, "steps", lambda: {"loss": round(loss(), 4)}
        ),
        anchor=anchor,
    )
    if p.update_method == "lora":
        model = lora.merge(trained)  # the same module tree, adapters folded in
    anchor_metrics = None
    if anchor is not None:
        anchor_metrics = {
            mn.ANCHOR_KL: anchor.mean_kl(model, p.batch_size),
            mn.ANCHOR_KL_START: anchor_start,
            mn.ANCHOR_TOKENS: anchor.tokens,
            mn.ANCHOR_VERSION: float(anchor.base_version or 0),
        }
    return Update(
        candidate=model,
        base_state=parent,
        train=result,
        replay_fraction=p.replay_fraction,
        replay_texts=len(data.real) if data.mode == "mixed" else 0,
        replay_tokens=data.replay_tokens,
        synthetic_tokens=data.synthetic_tokens,
        data=data,
        anchor=anchor_metrics,
    )
