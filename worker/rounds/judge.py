"""The second half of a round as stage functions: evaluate, meta-step, decide.

Same shape as :mod:`worker.rounds.stages`: typed inputs, a frozen result that knows its
metrics, ``tick`` for progress inside the stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core import metric_names as mn
from core.db.session import Database
from core.round_params import RoundParams
from worker.rounds.decide import Decision, DiversityCheck
from worker.rounds.decide import decide as judge
from worker.rounds.diversity_gate import (
    DiversityCache,
    Probe,
    References,
    check_diversity,
    largest_diverse_step,
    reference_diversity,
)
from worker.rounds.evaluate import perplexity
from worker.rounds.metastep import MetaStepResult
from worker.rounds.metastep import meta_step as interpolate
from worker.rounds.progress import Tick
from worker.rounds.textstats import DiversityStats
from worker.rounds.weights_file import release

Ids = list[list[int]]


@dataclass(frozen=True)
class EvalSets:
    """What perplexity is measured on: the round's own generated valid split and the
    corpus's held-out dev and test passages (all as ids)."""

    valid: Ids
    dev: Ids
    test: Ids


# --------------------------------------------------------------------------- evaluate


@dataclass(frozen=True)
class Evaluation:
    """The champion's perplexities (the candidate's come with the decision)."""

    valid_ppl: float
    dev_ppl: float
    test_ppl: float
    tokens_scored: int
    seconds: float

    def metrics(self) -> dict[str, float]:
        return {
            mn.CHAMPION_VALID_PPL: self.valid_ppl,
            mn.CHAMPION_DEV_PPL: self.dev_ppl,
            mn.CHAMPION_TEST_PPL: self.test_ppl,
            mn.TOKENS_SCORED: self.tokens_scored,
            mn.TOKENS_PER_S: self.tokens_scored / max(1e-9, self.seconds),
        }


def _passages(tick: Tick, offset: int, n: int, total: int) -> Callable[[float], None]:
    return lambda frac: tick(offset + frac * n, total, "passages")


def evaluate(model: Any, tok: Any, sets: EvalSets, p: RoundParams, tick: Tick) -> Evaluation:
    """The champion on valid, dev and test; progress in passages scored."""
    started = time.perf_counter()
    groups = (sets.valid, sets.dev, sets.test)
    total = sum(len(g) for g in groups)
    scored, before = [], 0
    for texts in groups:
        n, offset = len(texts), before
        scored.append(
            perplexity(
                model,
                tok,
                texts,
                p.batch_size,
                p.max_length,
                on_batch=_passages(tick, offset, n, total),
            )
        )
        before += n
    return Evaluation(
        valid_ppl=scored[0].ppl,
        dev_ppl=scored[1].ppl,
        test_ppl=scored[2].ppl,
        tokens_scored=sum(x.tokens for x in scored),
        seconds=time.perf_counter() - started,
    )


# --------------------------------------------------------------------------- meta-step


@dataclass(frozen=True)
class MetaStep:
    """θ = θ_champion + ε(θ_finetuned − θ_champion): every ε's gate perplexity, the best ε."""

    result: MetaStepResult

    def metrics(self) -> dict[str, float]:
        scores = {mn.gate_ppl_at(eps): v for eps, v in self.result.scores.items()}
        return scores | {mn.EPSILON_CHOSEN: self.result.epsilon}


def meta_step(
    candidate: Any,
    base_state: Mapping[str, torch.Tensor],
    tok: Any,
    sets: EvalSets,
    p: RoundParams,
    tick: Tick,
) -> MetaStep:
    """Leaves `candidate` at the best ε on the gate set (dev, or the generated valid split
    in the reference loop); progress in ε tried of the grid."""
    grid: Sequence[float] = p.epsilon_grid if p.meta_step else [1.0]
    gate = sets.dev if p.gate == "dev" else sets.valid
    planned = len(dict.fromkeys(float(e) for e in grid))
    tried = [0]

    def score(m: Any) -> float:
        value = perplexity(
            m,
            tok,
            gate,
            p.batch_size,
            p.max_length,
            on_batch=lambda frac: tick(tried[0] + frac, planned, "epsilons"),
        ).ppl
        tried[0] += 1
        return value

    return MetaStep(interpolate(candidate, base_state, grid, score, keep_delta=p.gate == "dev"))


# --------------------------------------------------------------------------- decide


def _div_metrics(who: mn.Who, d: DiversityStats) -> dict[str, float]:
    return {
        mn.distinct_1(who): d.distinct_1,
        mn.distinct_2(who): d.distinct_2,
        mn.repetition_rate(who): d.repetition_rate,
    }


def _ref_metrics(refs: References) -> dict[str, float]:
    """The parent's (``champion_*``) and the base's numbers."""
    return _div_metrics("champion", refs.parent) | (
        _div_metrics("base", refs.base) if refs.base else {}
    )


@dataclass(frozen=True)
class CandidateScores:
    """The candidate as the decision saw it (ε may differ from the meta-step's), with the
    diversity of parent, candidate and lineage base: filed under the evaluate stage.
    ``confirm`` is the promoted ε's check on the confirmation probe (``diversity_confirm``;
    its numbers are recorded per ε under the decide stage)."""

    valid_ppl: float
    dev_ppl: float
    test_ppl: float
    diversity: DiversityCheck
    confirm: DiversityCheck | None = None

    def metrics(self) -> dict[str, float]:
        div = self.diversity
        return {
            mn.CANDIDATE_VALID_PPL: self.valid_ppl,
            mn.CANDIDATE_DEV_PPL: self.dev_ppl,
            mn.CANDIDATE_TEST_PPL: self.test_ppl,
            **_div_metrics("champion", div.parent),
            **_div_metrics("candidate", div.candidate),
            **(_div_metrics("base", div.base) if div.base else {}),
            **(_div_metrics("real", div.real) if div.real else {}),
        }


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    epsilon: float
    candidate: CandidateScores

    def metrics(self) -> dict[str, float]:
        return {
            mn.IMPROVEMENT: self.decision.improvement,
            mn.PROMOTED: float(self.decision.promote),
            mn.EPSILON: self.epsilon,
        }


@dataclass(frozen=True)
class Judged:
    """What the decide stage needs from the round so far. ``base_state`` (the parent's
    weights) and the meta-step's delta are released once the ε is chosen (see
    :func:`decide`)."""

    parent_manifest: dict[str, Any]
    champion: Evaluation
    ms: MetaStep
    base_state: Mapping[str, torch.Tensor]


class _ProbeCount:
    """Probe samples drawn so far, from the probes' token callbacks (one probe run after
    another; a run's count starting over marks the next run)."""

    def __init__(self, prompts: int, planned_runs: int, tick: Tick) -> None:
        self.prompts, self.planned_runs, self.tick = prompts, planned_runs, tick
        self.runs, self.last = 0, 0
        self.epsilons_tried = 0

    def __call__(self, done: int, planned: int) -> None:
        if done < self.last:
            self.runs += 1
        self.last = done
        drawn = (min(self.runs, self.planned_runs - 1) + done / planned) * self.prompts
        self.tick(
            drawn,
            self.planned_runs * self.prompts,
            "probe samples",
            lambda: {"epsilons_tried": self.epsilons_tried},
        )


def decide(
    db: Database,
    lineage: str,
    models: tuple[Any, Any],
    judged: Judged,
    sets: EvalSets,
    cache: DiversityCache,
    probe: Probe,
    p: RoundParams,
    tick: Tick,
    record: Callable[[dict[str, float]], None],
    real: DiversityStats | None = None,
    confirm_probe: Probe | None = None,
) -> Verdict:
    """Promote or not. With the dev gate: the largest dev gain whose diversity holds (ε from
    best down); the reference loop compares generated-valid perplexity with no diversity
    gate. ``models`` is (candidate, tokenizer): the parent's probe numbers come from the
    cache, or from the candidate holding the parent's weights for the while; ``record``
    stores per-ε numbers; ``real`` is real held-out text's diversity at the probe's size
    (:mod:`.realtext`). With ``confirm_probe`` (``diversity_confirm``) an ε that passes
    on ``probe`` must pass on it too, against the parent's and base's numbers on it (measured
    or cached when first needed, recorded as ``*_confirm``) and the same real-text numbers
    (they depend on the probe's size, not its prompts). Progress in probe samples drawn of
    the most the stage may draw."""
    candidate, tok = models
    bs, ml = p.batch_size, p.max_length
    ms = judged.ms.result
    # Parent and base (unless cached), then one candidate probe per ε tried; as many again
    # on the confirmation probe at most.
    runs = 2 + len(ms.scores)
    count = _ProbeCount(len(probe.prompts), runs * (2 if confirm_probe else 1), tick)
    refs = reference_diversity(
        db,
        lineage,
        cache,
        probe,
        candidate,
        tok,
        (judged.parent_manifest, judged.base_state),
        count,
    )

    def check(on: Probe = probe, against: References = refs) -> DiversityCheck:
        if on is probe:
            count.epsilons_tried += 1
        return check_diversity(
            against,
            on,
            candidate,
            tok,
            (p.diversity_tolerance, p.base_diversity_tolerance),
            count,
            real=(real, p.real_diversity_tolerance) if real is not None else None,
        )

    confirm_refs: list[References] = []  # the parent's and base's on the confirmation probe
    confirmed: list[DiversityCheck] = []  # the confirmation probe's checks, in order

    def confirm() -> DiversityCheck:
        assert confirm_probe is not None
        if not confirm_refs:  # first needed: the parent's and base's numbers on it
            parent = (judged.parent_manifest, judged.base_state)
            refs2 = reference_diversity(
                db, lineage, cache, confirm_probe, candidate, tok, parent, count
            )
            confirm_refs.append(refs2)
            record({mn.on_confirm(k): v for k, v in _ref_metrics(confirm_refs[0]).items()})
        confirmed.append(check(confirm_probe, confirm_refs[0]))
        return confirmed[-1]

    if p.gate == "dev":
        verdict, div, eps = largest_diverse_step(
            ms,
            judged.base_state,
            candidate,
            judged.champion.dev_ppl,
            p.promotion_margin,
            check,
            record,
            confirm if confirm_probe is not None else None,
        )
        cand_dev = ms.scores[eps]
        cand_valid = perplexity(candidate, tok, sets.valid, bs, ml).ppl
    else:  # the reference loop: its own generated valid split, no diversity check
        eps = ms.epsilon
        div = check()
        cand_dev = perplexity(candidate, tok, sets.dev, bs, ml).ppl
        cand_valid = perplexity(candidate, tok, sets.valid, bs, ml).ppl
        verdict = judge(
            "generated-valid", judged.champion.valid_ppl, cand_valid, p.promotion_margin, None
        )
    # Consumed: the fine-tuned copy inside the delta is the round's largest buffer left, and
    # nothing after this point needs it or the parent's weights.
    release(judged.base_state)
    if ms.delta is not None:
        release(ms.delta)
    # Measured on the weights the decision is about (ε may differ from the meta-step's).
    cand_test = perplexity(candidate, tok, sets.test, bs, ml).ppl
    # The promoted ε was the last one confirmed (the walk stops at the ε it promotes).
    second = confirmed[-1] if confirmed and verdict.promote else None
    return Verdict(verdict, eps, CandidateScores(cand_valid, cand_dev, cand_test, div, second))
