"""One self-update round: generate → select → update → evaluate → meta-step → decide.

Each stage is a plain function in its own module; this module wires them together, records
every number in `round_metrics`, moves `stage`/`progress`, and promotes atomically.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from core.db import rounds as records
from core.db.session import Database
from core.modeling.device import pick_device
from core.modeling.loader import load_checkpoint
from core.registry import get_champion
from core.round_params import RoundParams
from core.settings import Settings
from core.store import verify_checkpoint
from worker.rounds.data import (
    SPLIT_SEED,
    Corpus,
    eval_sample,
    load_corpus,
    load_prompt_file,
    passages,
    prompts_from,
)
from worker.rounds.decide import DiversityCheck, decide
from worker.rounds.diversity_gate import (
    DiversityCache,
    Probe,
    check_diversity,
    largest_diverse_step,
)
from worker.rounds.evaluate import encode_texts, per_sample_loss, perplexity
from worker.rounds.generate import generate_samples
from worker.rounds.metastep import meta_step, state_copy
from worker.rounds.promotion import promote_candidate
from worker.rounds.select import FilterConfig, Sample, dedup, filter_degenerate, split_train_valid
from worker.rounds.select import select as pick
from worker.rounds.textstats import DiversityStats
from worker.rounds.update import EpochStats, TrainConfig, finetune, replay_ids

log = logging.getLogger(__name__)

# Stage → share of the round's progress bar at its end.
PROGRESS = {
    "generate": 0.25,
    "select": 0.30,
    "update": 0.60,
    "evaluate": 0.75,
    "meta_step": 0.90,
    "decide": 1.0,
}


@dataclass
class RoundOutcome:
    decision: str
    reason: str
    candidate_version: int | None


class Round:
    def __init__(self, settings: Settings, db: Database, round_id: int, params: RoundParams):
        self.settings, self.db, self.id, self.p = settings, db, round_id, params
        self.rng = random.Random(params.seed)
        self.timings: dict[str, float] = {}
        self._div_cache = DiversityCache(Path(settings.checkpoint_dir) / settings.lineage)

    # -- bookkeeping -------------------------------------------------------------------
    def metrics(self, stage: str, values: dict[str, float], step: int | None = None) -> None:
        records.add_metrics(self.db, self.id, stage, values, step)

    def enter(self, stage: str) -> float:
        if records.is_cancelled(self.db, self.id):
            raise records.RoundCancelled(f"round {self.id} was cancelled")
        prev = [s for s in PROGRESS if PROGRESS[s] < PROGRESS[stage]]
        records.set_progress(self.db, self.id, stage, PROGRESS[prev[-1]] if prev else 0.0)
        log.info("round %d: %s", self.id, stage)
        return time.perf_counter()

    def leave(self, stage: str, started: float) -> None:
        seconds = time.perf_counter() - started
        self.timings[stage] = seconds
        self.metrics(stage, {"seconds": seconds})
        records.set_progress(self.db, self.id, stage, PROGRESS[stage])

    # -- inputs ------------------------------------------------------------------------
    def prompts(self, corpus: Corpus) -> list[str]:
        p = self.p
        if p.prompts:
            return [x for x in p.prompts if x.strip()]
        if p.prompt_source == "file":
            assert p.prompt_file is not None
            return load_prompt_file(
                self.settings.round_data_path,
                p.prompt_file,
                p.num_prompts,
                self.settings.round_data_max_bytes,
            )
        if p.prompt_source == "served":
            served = records.served_prompts(self.db, self.settings.lineage, p.num_prompts)
            if served:
                return served
            log.info("round %d: no served prompts recorded; using the corpus", self.id)
        return prompts_from(corpus.train, p.num_prompts, self.rng)

    # -- the round ---------------------------------------------------------------------
    def run(self) -> RoundOutcome:
        p, settings = self.p, self.settings
        torch.manual_seed(p.seed)
        with self.db.session() as s:
            champ = get_champion(s, settings.lineage)
            if champ is None:
                raise RuntimeError("no champion checkpoint: start the API once to import it")
            base_version, champ_path, champ_manifest = champ.version, champ.path, champ.manifest
        records.update_round(self.db, self.id, base_version=base_version)
        # Float32 master weights: training autocasts to bf16 where that is fast.
        verify_checkpoint(Path(champ_path), champ_manifest)
        champion = load_checkpoint(Path(champ_path), pick_device(settings.device), torch.float32)
        model, tok = champion.model, champion.tokenizer
        corpus = load_corpus(
            p.corpus,
            seed=SPLIT_SEED,
            root=settings.round_data_path,
            max_bytes=settings.round_data_max_bytes,
        )
        # Tokenised once here; every perplexity below scores these ids.
        dev_texts = encode_texts(tok, eval_sample(corpus.dev, p.eval_passages))
        test_texts = encode_texts(tok, eval_sample(corpus.test, p.eval_passages))
        self.metrics(
            "data",
            {
                "train_docs": len(corpus.train),
                "dev_docs": len(corpus.dev),
                "test_docs": len(corpus.test),
                "dev_passages": len(dev_texts),
                "test_passages": len(test_texts),
            },
        )

        # generate
        t = self.enter("generate")
        prompts = self.prompts(corpus)
        gen = generate_samples(
            model,
            tok,
            prompts,
            p.samples_per_prompt,
            p.max_new_tokens,
            p.temperature,
            p.top_p,
            p.seed,
            p.generate_batch_size,
        )
        self.metrics(
            "generate",
            {
                "prompts": len(prompts),
                "generated": len(gen.samples),
                "tokens": gen.tokens,
                "tokens_per_s": gen.tokens_per_s,
                "seed": p.seed,
            },
        )
        self.leave("generate", t)

        # select
        t = self.enter("select")
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        samples = [
            Sample(text=g.text, prompt=g.prompt, token_ids=tuple(bos + g.prompt_ids + g.ids))
            for g in gen.samples
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
            losses = per_sample_loss(
                model,
                tok,
                [list(s.token_ids) for s in samples],
                batch_size=p.batch_size,
                max_length=p.max_length,
            )
            samples = [
                Sample(text=s.text, prompt=s.prompt, loss=lo, token_ids=s.token_ids)
                for s, lo in zip(samples, losses, strict=True)
            ]
        chosen = pick(samples, p.train_size + p.valid_size, p.strategy, self.rng)
        if len(chosen) < 2:
            raise RuntimeError(f"only {len(chosen)} usable samples after selection")
        valid_fraction = p.valid_size / (p.train_size + p.valid_size)
        train_s, valid_s = split_train_valid(chosen, valid_fraction, self.rng)
        # The ids as generated (BOS + prompt + continuation): nothing is re-tokenised.
        train_texts = [list(s.token_ids) for s in train_s]
        valid_texts = [list(s.token_ids) for s in valid_s]
        self.metrics(
            "select",
            {
                "generated": len(gen.samples),
                "filtered_degenerate": n_filtered,
                "dedup_exact": n_exact,
                "dedup_near": n_near,
                "selected": len(chosen),
                "train": len(train_texts),
                "valid": len(valid_texts),
            },
        )
        self.leave("select", t)

        # update
        t = self.enter("update")
        replay, got = replay_ids(
            passages(corpus.train), tok, train_texts, p.replay_fraction, p.max_length, self.rng
        )
        synth = sum(len(x) for x in train_texts)
        if p.replay_fraction > 0:
            self.metrics(
                "update",
                {
                    "replay_tokens": got,
                    "synthetic_tokens": synth,
                    "replay_token_fraction": got / max(1, got + synth),
                },
            )
        base_state = state_copy(model)
        candidate = copy.deepcopy(model)
        cfg_t = TrainConfig(
            learning_rate=p.learning_rate,
            epochs=p.epochs,
            batch_size=p.batch_size,
            max_length=p.max_length,
            seed=p.seed,
        )

        def on_epoch(e: EpochStats) -> None:
            vals = {"train_loss": e.train_loss, "tokens": e.tokens, "seconds": e.seconds}
            if e.valid_loss is not None:
                vals["valid_loss"] = e.valid_loss
            self.metrics("update", vals, step=e.epoch)

        result = finetune(candidate, tok, train_texts + replay, valid_texts, cfg_t, on_epoch)
        self.metrics(
            "update",
            {
                "tokens_trained": result.tokens_trained,
                "tokens_per_s": result.tokens_per_s,
                "best_epoch": result.best_epoch,
                "stopped_early": float(result.stopped_early),
                "replay_texts": len(replay),
            },
        )
        self.leave("update", t)

        # evaluate (champion once; candidate after the meta-step)
        t = self.enter("evaluate")
        bs, ml = p.batch_size, p.max_length
        scored = [perplexity(model, tok, x, bs, ml) for x in (valid_texts, dev_texts, test_texts)]
        champ_valid, champ_dev, champ_test = (x.ppl for x in scored)
        scored_tokens = sum(x.tokens for x in scored)
        self.metrics(
            "evaluate",
            {
                "champion_valid_ppl": champ_valid,
                "champion_dev_ppl": champ_dev,
                "champion_test_ppl": champ_test,
                "tokens_scored": scored_tokens,
                "tokens_per_s": scored_tokens / max(1e-9, time.perf_counter() - t),
            },
        )
        self.leave("evaluate", t)

        # meta-step: θ = θ_champion + ε(θ_finetuned − θ_champion), ε by dev perplexity
        t = self.enter("meta_step")
        grid = p.epsilon_grid if p.meta_step else [1.0]
        gate_texts = dev_texts if p.gate == "dev" else valid_texts
        ms = meta_step(
            candidate,
            base_state,
            grid,
            lambda m: perplexity(m, tok, gate_texts, bs, ml).ppl,
            keep_delta=p.gate == "dev",
        )
        self.metrics("meta_step", {f"gate_ppl_eps_{eps:g}": v for eps, v in ms.scores.items()})
        self.metrics("meta_step", {"epsilon_chosen": ms.epsilon})
        self.leave("meta_step", t)

        # decide
        t = self.enter("decide")
        probe = self._probe(corpus)

        def check() -> DiversityCheck:
            return check_diversity(
                self.db,
                settings.lineage,
                self._div_cache,
                probe,
                (model, candidate, tok),
                champ_manifest,
                (p.diversity_tolerance, p.base_diversity_tolerance),
            )

        if p.gate == "dev":
            verdict, div, eps = largest_diverse_step(
                ms,
                base_state,
                candidate,
                champ_dev,
                p.promotion_margin,
                check,
                lambda values: self.metrics("decide", values),
            )
            cand_dev = ms.scores[eps]
            cand_valid = perplexity(candidate, tok, valid_texts, bs, ml).ppl
        else:  # the reference loop: its own generated valid split, no diversity check
            eps = ms.epsilon
            div = check()
            cand_dev = perplexity(candidate, tok, dev_texts, bs, ml).ppl
            cand_valid = perplexity(candidate, tok, valid_texts, bs, ml).ppl
            verdict = decide("generated-valid", champ_valid, cand_valid, p.promotion_margin, None)
        del base_state, ms
        # Measured on the weights the decision is about (ε may differ from the meta-step's).
        cand_test = perplexity(candidate, tok, test_texts, bs, ml).ppl
        self.metrics(
            "evaluate",
            {
                "candidate_valid_ppl": cand_valid,
                "candidate_dev_ppl": cand_dev,
                "candidate_test_ppl": cand_test,
                **_div_metrics("champion", div.parent),
                **_div_metrics("candidate", div.candidate),
                **(_div_metrics("base", div.base) if div.base else {}),
            },
        )
        self.metrics(
            "decide",
            {
                "improvement": verdict.improvement,
                "promoted": float(verdict.promote),
                "epsilon": eps,
            },
        )
        version = None
        if verdict.promote:
            version, manifest = promote_candidate(
                settings, self.db, self.id, candidate, tok, base_version
            )
            self._div_cache.put(manifest, probe, div.candidate)
        self.leave("decide", t)
        return RoundOutcome("promoted" if verdict.promote else "rejected", verdict.reason, version)

    def _probe(self, corpus: Corpus) -> Probe:
        p = self.p
        return Probe.from_train(
            corpus.train,
            p.diversity_prompts,
            p.max_new_tokens,
            p.temperature,
            p.top_p,
            p.generate_batch_size,
        )


def _div_metrics(who: str, d: DiversityStats) -> dict[str, float]:
    return {
        f"{who}_distinct_1": d.distinct_1,
        f"{who}_distinct_2": d.distinct_2,
        f"{who}_repetition_rate": d.repetition_rate,
    }


def run_round(settings: Settings, db: Database, round_id: int) -> RoundOutcome | None:
    """Claim and run one round. Returns None when another delivery owns it."""
    if not records.claim(
        db,
        round_id,
        stale_after_s=settings.round_stale_after_s,
        worker_stale_after_s=settings.worker_stale_after_s,
    ):
        log.info("round %d not claimable (already taken or finished); skipping", round_id)
        return None
    row = records.get_round(db, round_id)
    assert row is not None
    params = RoundParams.model_validate(row.params)
    rnd = Round(settings, db, round_id, params)
    started = time.perf_counter()
    try:
        with records.Heartbeat(db, round_id):
            outcome = rnd.run()
    except records.RoundCancelled as e:
        log.info("%s", e)
        records.finish(db, round_id, "cancelled", error=str(e))
        return None
    except BaseException as e:
        log.exception("round %d failed", round_id)
        records.finish(db, round_id, "failed", error=f"{type(e).__name__}: {e}")
        raise
    records.add_metrics(db, round_id, "round", {"seconds": time.perf_counter() - started})
    records.finish(
        db,
        round_id,
        "succeeded",
        decision=outcome.decision,
        reason=outcome.reason,
        candidate_version=outcome.candidate_version,
        progress=1.0,
        stage="done",
    )
    return outcome
