"""One self-update round: generate → select → update → evaluate → meta-step → decide.

Each stage is a plain function in its own module; this module wires them together, records
every number in `round_metrics`, moves `stage`/`progress`, and promotes atomically.
"""

from __future__ import annotations

import copy
import logging
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select

from selflm.checkpoints import get_champion, next_version, promote
from selflm.db.models import Checkpoint, ServedPrompt
from selflm.db.session import Database
from selflm.modeling.device import pick_device
from selflm.modeling.loader import load_checkpoint
from selflm.modeling.store import verify_checkpoint, write_checkpoint
from selflm.notify import announce
from selflm.rounds import records
from selflm.rounds.data import (
    SPLIT_SEED,
    Corpus,
    eval_sample,
    load_corpus,
    passages,
    prompts_from,
)
from selflm.rounds.decide import Decision, DiversityCheck, decide
from selflm.rounds.diversity_gate import DiversityCache, Probe, lineage_root, weights_key
from selflm.rounds.evaluate import encode_texts, per_sample_loss, perplexity
from selflm.rounds.generate import generate_samples
from selflm.rounds.metastep import MetaStepResult, interpolate_into, meta_step, state_copy
from selflm.rounds.params import RoundParams
from selflm.rounds.select import FilterConfig, Sample, dedup, filter_degenerate, split_train_valid
from selflm.rounds.select import select as pick
from selflm.rounds.textstats import DiversityStats
from selflm.rounds.update import EpochStats, TrainConfig, finetune
from selflm.settings import Settings

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


class RoundCancelled(RuntimeError):
    pass


@dataclass
class RoundOutcome:
    decision: str
    reason: str
    candidate_version: int | None


class Heartbeat:
    """Keeps `heartbeat_at` fresh while a long stage runs, from a side thread."""

    def __init__(self, db: Database, round_id: int, every_s: float = 10.0) -> None:
        self._db, self._id, self._every = db, round_id, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="round-heartbeat")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                records.heartbeat(self._db, self._id)
            except Exception:
                log.warning("heartbeat failed", exc_info=True)


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
            raise RoundCancelled(f"round {self.id} was cancelled")
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
            lines = [x.strip() for x in Path(p.prompt_file).read_text().splitlines()]
            return [x for x in lines if x][: p.num_prompts]
        if p.prompt_source == "served":
            with self.db.session() as s:
                served = list(
                    s.scalars(
                        select(ServedPrompt.prompt)
                        .where(ServedPrompt.lineage == self.settings.lineage)
                        .order_by(ServedPrompt.id.desc())
                        .limit(p.num_prompts)
                    )
                )
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
        corpus = load_corpus(p.corpus, seed=SPLIT_SEED)
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
        replay = self._replay(corpus, tok, train_texts)
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
        if p.gate == "dev":
            verdict, div, eps = self._decide_dev(
                model, candidate, tok, probe, champ_manifest, ms, base_state, champ_dev
            )
            cand_dev = ms.scores[eps]
            cand_valid = perplexity(candidate, tok, valid_texts, bs, ml).ppl
        else:  # the reference loop: its own generated valid split, no diversity check
            eps = ms.epsilon
            div = self._diversity_check(model, candidate, tok, probe, champ_manifest)
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
            version, manifest = self._promote(candidate, tok, base_version)
            self._div_cache.put(manifest, probe, div.candidate)
        self.leave("decide", t)
        return RoundOutcome("promoted" if verdict.promote else "rejected", verdict.reason, version)

    def _decide_dev(
        self,
        model: Any,
        candidate: Any,
        tok: Any,
        probe: Probe,
        manifest: dict[str, Any],
        ms: MetaStepResult,
        base_state: dict[str, torch.Tensor],
        champ_dev: float,
    ) -> tuple[Decision, DiversityCheck, float]:
        """The largest dev gain whose diversity holds: ε from best dev perplexity down, until
        one passes or the gain falls under the margin. A smaller ε keeps the candidate closer
        to its parent, so a step whose full size loses diversity can still be taken in part."""
        assert ms.delta is not None
        current = ms.epsilon
        tried: list[str] = []
        for eps in ms.ranked():
            if eps != current:
                interpolate_into(candidate, base_state, ms.delta, eps)
                current = eps
            div = self._diversity_check(model, candidate, tok, probe, manifest)
            verdict = decide("dev", champ_dev, ms.scores[eps], self.p.promotion_margin, div)
            self.metrics(
                "decide",
                {
                    f"diversity_ok_eps_{eps:g}": float(not div.failures()),
                    f"candidate_distinct_2_eps_{eps:g}": div.candidate.distinct_2,
                    f"candidate_repetition_rate_eps_{eps:g}": div.candidate.repetition_rate,
                },
            )
            if verdict.promote or verdict.improvement < self.p.promotion_margin:
                break
            tried.append(f"ε={eps:g}")
        note = f" (diversity failed at {', '.join(tried)})" if tried and verdict.promote else ""
        reason = verdict.reason.replace(":", f" at ε={current:g}{note}:", 1)
        return Decision(verdict.promote, reason, verdict.improvement), div, current

    def _replay(self, corpus: Corpus, tok: Any, train_ids: list[list[int]]) -> list[list[int]]:
        """Real train-split passages (as ids) until they make `replay_fraction` of the tokens."""
        frac = self.p.replay_fraction
        if frac <= 0:
            return []
        synth = sum(len(x) for x in train_ids)
        target = synth * frac / (1 - frac)
        pool = passages(corpus.train)
        self.rng.shuffle(pool)
        out: list[list[int]] = []
        got = 0
        for ids in encode_texts(tok, pool):
            if got >= target:
                break
            out.append(ids[: self.p.max_length])
            got += len(out[-1])
        self.metrics(
            "update",
            {
                "replay_tokens": got,
                "synthetic_tokens": synth,
                "replay_token_fraction": got / max(1, got + synth),
            },
        )
        return out

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

    def _diversity_check(
        self, model: Any, candidate: Any, tok: Any, probe: Probe, manifest: dict[str, Any]
    ) -> DiversityCheck:
        """Parent, lineage base and candidate on one fixed probe; parent and base cached."""
        cache = self._div_cache
        parent = cache.measure(model, tok, manifest, probe)
        base: DiversityStats | None = None
        root = lineage_root(self.db, self.settings.lineage)
        if root is not None and weights_key(root.manifest) == weights_key(manifest):
            base = parent
        elif root is not None:
            base = cache.get(root.manifest, probe)
            if base is None:
                try:
                    verify_checkpoint(Path(root.path), root.manifest)
                    loaded = load_checkpoint(Path(root.path), model.device, torch.float32)
                except Exception as e:  # the base's files are gone: check the parent only
                    log.warning("round %d: base v%d unusable (%s)", self.id, root.version, e)
                else:
                    base = cache.measure(loaded.model, loaded.tokenizer, root.manifest, probe)
                    del loaded
        return DiversityCheck(
            parent=parent,
            candidate=probe.run(candidate, tok),
            tolerance=self.p.diversity_tolerance,
            base=base,
            base_tolerance=self.p.base_diversity_tolerance,
        )

    def _promote(self, candidate: Any, tok: Any, parent: int) -> tuple[int, dict[str, Any]]:
        """Write atomically, record, move the champion pointer in one transaction, announce."""
        lineage = self.settings.lineage
        with self.db.session() as s:
            version = next_version(s, lineage)
        stored = write_checkpoint(
            candidate,
            tok,
            self.settings.checkpoint_dir,
            lineage,
            version,
            source=f"round {self.id}",
            parent_version=parent,
        )
        with self.db.session() as s:
            if records.is_cancelled(self.db, self.id):
                raise RoundCancelled(f"round {self.id} was cancelled before promotion")
            current = get_champion(s, lineage)
            if current is None or current.version != parent:
                raise RuntimeError(
                    f"champion moved from v{parent} to "
                    f"v{current.version if current else None} during the round; not promoting"
                )
            s.add(
                Checkpoint(
                    lineage=lineage,
                    version=version,
                    parent_version=parent,
                    path=str(stored.path),
                    manifest=stored.manifest,
                    status="candidate",
                    source=f"round {self.id}",
                    produced_by_round=self.id,
                )
            )
            s.flush()
            promote(s, lineage, version)
            # The round records its candidate in the same transaction as the promotion.
            s.execute(records.update_stmt(self.id, candidate_version=version))
        announce(self.settings.redis_url, lineage, version)
        log.info("round %d promoted v%d (parent v%d)", self.id, version, parent)
        return version, stored.manifest


def _div_metrics(who: str, d: DiversityStats) -> dict[str, float]:
    return {
        f"{who}_distinct_1": d.distinct_1,
        f"{who}_distinct_2": d.distinct_2,
        f"{who}_repetition_rate": d.repetition_rate,
    }


def run_round(settings: Settings, db: Database, round_id: int) -> RoundOutcome | None:
    """Claim and run one round. Returns None when another delivery owns it."""
    if not records.claim(db, round_id, stale_after_s=settings.round_stale_after_s):
        log.info("round %d not claimable (already taken or finished); skipping", round_id)
        return None
    row = records.get_round(db, round_id)
    assert row is not None
    params = RoundParams.model_validate(row.params)
    rnd = Round(settings, db, round_id, params)
    started = time.perf_counter()
    try:
        with Heartbeat(db, round_id):
            outcome = rnd.run()
    except RoundCancelled as e:
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
