"""One self-update round: generate → select → update → evaluate → meta-step → decide.

The stages are functions with typed inputs and results (:mod:`.stages`, :mod:`.judge`);
this module lists them in order. ``with self.stage(name)`` checks for cancellation, opens
the stage's slice of the progress bar, times it and records its ``seconds``; ``st.result``
records the metrics a stage's result knows; ``st.tick`` reports progress inside the stage.
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch

from core import metric_names as mn
from core import registry
from core.db import rounds as records
from core.db.session import Database
from core.round_params import RoundParams
from core.settings import Settings
from worker.rounds import anchor, judge, stages
from worker.rounds.diversity_gate import DiversityCache, Probe
from worker.rounds.peak_rss import PeakRss
from worker.rounds.progress import Progress, Stage, stage
from worker.rounds.promotion import promote_candidate
from worker.rounds.realtext import RealTextCache
from worker.rounds.train_modes import limit_onednn_cache
from worker.rounds.weights_file import swapped_in

log = logging.getLogger(__name__)


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
        self.peaks: dict[str, int] = {}  # stage → the process's peak RSS during it (bytes)
        self.rss = PeakRss()
        self.progress = Progress(db, round_id, settings.progress_interval_s)
        self._div_cache = DiversityCache(Path(settings.checkpoint_dir) / settings.lineage)
        self._real_text = RealTextCache(Path(settings.checkpoint_dir) / settings.lineage)

    def stage(self, name: str) -> AbstractContextManager[Stage]:
        return stage(self.db, self.id, name, self.progress, self.timings, self.peaks, self.rss)

    def run(self) -> RoundOutcome:
        p, settings, lineage = self.p, self.settings, self.settings.lineage
        torch.manual_seed(p.seed)
        champion = registry.champion(self.db, lineage)
        if champion is None:
            raise RuntimeError("no champion checkpoint: start the API once to import it")
        records.update_round(self.db, self.id, base_version=champion.version)
        self.rss.reset()
        ready = stages.prepare(champion, settings, p)
        loaded = self.rss.read()
        if loaded is not None:
            self.peaks[mn.DATA] = loaded
        records.add_metrics(self.db, self.id, mn.DATA, ready.metrics() | self._memory(mn.DATA))
        model, tok = ready.model, ready.tokenizer

        with self.stage(mn.GENERATE) as st:
            prompts = stages.round_prompts(self.db, settings, p, ready.pool, self.rng)
            gen = st.result(stages.generate(model, tok, prompts, p, st.tick))

        with self.stage(mn.SELECT) as st:
            sel = st.result(stages.select(model, tok, gen, p, self.rng, st.tick))
        sets = judge.EvalSets(valid=sel.valid, dev=ready.dev, test=ready.test)

        with self.stage(mn.UPDATE) as st:
            upd = st.result(
                stages.update(
                    model,
                    tok,
                    ready.pool,
                    sel,
                    p,
                    self.rng,
                    st.tick,
                    on_epoch=lambda e: st.record(stages.epoch_metrics(e), step=e.epoch),
                    parent=ready.parent,
                    spill_dir=self._div_cache.path.parent,
                    anchor_base=lambda: anchor.open_base(self.db, lineage, champion, model),
                )
            )
        candidate = upd.candidate  # the round's one model, fine-tuned in place

        with self.stage(mn.EVALUATE) as st, swapped_in(candidate, upd.base_state):
            champ = st.result(judge.evaluate(candidate, tok, sets, p, st.tick))

        with self.stage(mn.META_STEP) as st:
            ms = st.result(judge.meta_step(candidate, upd.base_state, tok, sets, p, st.tick))

        with self.stage(mn.DECIDE) as st:
            probe = self._probe(ready)
            confirm = self._probe(ready, confirm=True) if p.diversity_confirm else None
            verdict = judge.decide(
                self.db,
                lineage,
                (candidate, tok),
                judge.Judged(champion.manifest, champ, ms, upd.base_state),
                sets,
                self._div_cache,
                probe,
                p,
                st.tick,
                record=st.record,
                real=self._real_text.measure(
                    ready.corpus.dev, tok, len(probe.prompts), p.max_new_tokens
                ),
                confirm_probe=confirm,
            )
            st.record(verdict.candidate.metrics(), stage=mn.EVALUATE)
            st.result(verdict)
            version = None
            if verdict.decision.promote:
                ref = promote_candidate(settings, self.db, self.id, candidate, tok, champion)
                self._div_cache.put(ref.manifest, probe, verdict.candidate.diversity.candidate)
                if confirm is not None and verdict.candidate.confirm is not None:
                    self._div_cache.put(ref.manifest, confirm, verdict.candidate.confirm.candidate)
                version = ref.version

        decision = "promoted" if verdict.decision.promote else "rejected"
        return RoundOutcome(decision, verdict.decision.reason, version)

    def _memory(self, name: str) -> dict[str, float]:
        return {mn.MEMORY: float(self.peaks[name])} if name in self.peaks else {}

    def peak(self) -> dict[str, float]:
        """The whole round's peak RSS so far (the largest stage peak), as a metric."""
        return {mn.MEMORY: float(max(self.peaks.values()))} if self.peaks else {}

    def _probe(self, ready: stages.Prepared, confirm: bool = False) -> Probe:
        """The gate's probe, or with ``confirm`` its confirmation probe (same settings, other
        prompts and sampling seed: :func:`~worker.rounds.diversity_gate.probe_seeds`)."""
        p = self.p
        return Probe.from_train(
            ready.corpus.train,
            p.diversity_prompts,
            p.max_new_tokens,
            p.temperature,
            p.top_p,
            p.generate_batch_size,
            round_seed=p.seed if p.diversity_probe == "per_round" else None,
            confirm=confirm,
        )


def run_round(settings: Settings, db: Database, round_id: int) -> RoundOutcome | None:
    """Claim and run one round. Returns None when another delivery owns it."""
    limit_onednn_cache()
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
    records.add_metrics(
        db, round_id, mn.ROUND, {mn.SECONDS: time.perf_counter() - started} | rnd.peak()
    )
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
