"""The decide stage's diversity measurement: a seeded probe, cached per checkpoint.

By default (``diversity_probe: "fixed"``) a round samples the same prompts (drawn from the
domain train split with a fixed seed) with the same sampling seed every time, so a model's
diversity numbers are a function of its weights and of the probe's settings. With
``"per_round"`` each round draws its own prompts and sampling seed from its ``seed``: a lineage
then cannot drift by passing one fixed set of prompts round after round (selection on a fixed
probe), at the price of measuring the parent and the base again every round. Either way:

* comparing a candidate with the lineage's *base* (its first version) as well as with its
  parent, so small per-round losses cannot add up unnoticed across rounds;
* caching each checkpoint's numbers in ``<checkpoint_dir>/<lineage>/diversity.json``, keyed by
  the checkpoint's file digests and the probe's settings: the parent's and the base's numbers
  are measured once, not every round.

With ``diversity_confirm`` an ε that passes on the round's probe is measured again on a
*confirmation probe*: as many prompts, drawn with other seeds (:func:`probe_seeds` with
``confirm=True``), with the parent and the base measured on it too (cached under its own
key). The first ε whose noisy reading passes is the one promoted, so the gate's own reading
of it is biased toward passing (a winner's curse); a second, independent reading is not.

One round per lineage runs at a time (a unique index), so the cache has one writer per file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core import metric_names as mn
from core import registry
from core.db.session import Database
from core.store import verify_checkpoint
from worker.rounds.data import prompts_from
from worker.rounds.decide import Decision, DiversityCheck, decide
from worker.rounds.generate import generate_samples
from worker.rounds.metastep import MetaStepResult, interpolate_into
from worker.rounds.stats_file import StatsFile
from worker.rounds.textstats import DiversityStats, diversity
from worker.rounds.weights_file import FileWeights, compatible, swapped_in

log = logging.getLogger(__name__)

PROMPT_SEED = 2468  # the fixed probe's prompt draw from the train split
SAMPLE_SEED = 1357  # the fixed probe's sampling seed
CONFIRM_PROMPT_SEED = 9753  # the fixed confirmation probe's prompt draw (diversity_confirm)
CONFIRM_SAMPLE_SEED = 3579  # the fixed confirmation probe's sampling seed


def probe_seeds(round_seed: int | None, confirm: bool = False) -> tuple[int, int]:
    """(prompt seed, sampling seed): the fixed probe's for None, else a pair of the round's own
    (never the fixed pair, so a per-round probe is never the fixed one under another name).

    ``confirm`` gives the confirmation probe's pair instead: fixed constants of its own for
    None, else a pair mixed from the round's seed under another name ("diversity-confirm"),
    so it is never the main probe's and is the same whenever the round is run again."""
    if round_seed is None:
        return (CONFIRM_PROMPT_SEED, CONFIRM_SAMPLE_SEED) if confirm else (PROMPT_SEED, SAMPLE_SEED)
    mixed = random.Random(f"diversity-{'confirm' if confirm else 'probe'}:{round_seed}")
    return mixed.randrange(2**31), mixed.randrange(2**31)


CACHE_FILE = "diversity.json"


def weights_key(manifest: dict[str, Any]) -> str:
    """A digest of a checkpoint's files: equal keys mean identical weights and tokenizer."""
    files = manifest.get("files", {})
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Probe:
    prompts: tuple[str, ...]
    max_new_tokens: int
    temperature: float
    top_p: float
    batch_size: int
    sample_seed: int = SAMPLE_SEED

    @classmethod
    def from_train(
        cls,
        train_docs: list[str],
        n_prompts: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        batch_size: int,
        round_seed: int | None = None,
        confirm: bool = False,
    ) -> Probe:
        """The fixed probe, or with ``round_seed`` that round's own; with ``confirm`` the
        matching confirmation probe (:func:`probe_seeds`)."""
        prompt_seed, sample_seed = probe_seeds(round_seed, confirm)
        prompts = prompts_from(train_docs, n_prompts, random.Random(prompt_seed))
        return cls(tuple(prompts), max_new_tokens, temperature, top_p, batch_size, sample_seed)

    def key(self) -> str:
        """The settings that change the numbers (not the batch size: rows are seeded alone)."""
        body = [list(self.prompts), self.max_new_tokens, self.temperature, self.top_p]
        body.append(self.sample_seed)
        return hashlib.sha256(json.dumps(body).encode()).hexdigest()[:16]

    def run(
        self, model: Any, tokenizer: Any, on_token: Callable[[int, int], None] | None = None
    ) -> DiversityStats:
        gen = generate_samples(
            model,
            tokenizer,
            list(self.prompts),
            1,
            self.max_new_tokens,
            self.temperature,
            self.top_p,
            self.sample_seed,
            self.batch_size,
            on_token,
        )
        return diversity([s.text for s in gen.samples])


class DiversityCache:
    """``{"<weights key>:<probe key>": {distinct_1, distinct_2, repetition_rate}}`` on disk."""

    def __init__(self, lineage_dir: Path) -> None:
        self.path = lineage_dir / CACHE_FILE
        self._file = StatsFile(self.path)

    def get(self, manifest: dict[str, Any], probe: Probe) -> DiversityStats | None:
        return self._file.get(f"{weights_key(manifest)}:{probe.key()}")

    def put(self, manifest: dict[str, Any], probe: Probe, stats: DiversityStats) -> None:
        self._file.put(f"{weights_key(manifest)}:{probe.key()}", stats)

    def measure(
        self,
        model: Any,
        tokenizer: Any,
        manifest: dict[str, Any],
        probe: Probe,
        on_token: Callable[[int, int], None] | None = None,
    ) -> DiversityStats:
        """The cached numbers for this checkpoint, or measure and cache them."""
        cached = self.get(manifest, probe)
        if cached is not None:
            return cached
        stats = probe.run(model, tokenizer, on_token)
        self.put(manifest, probe, stats)
        return stats


@dataclass(frozen=True)
class References:
    """The diversity a candidate is held to: its parent's and the lineage base's."""

    parent: DiversityStats
    base: DiversityStats | None


def reference_diversity(
    db: Database,
    lineage: str,
    cache: DiversityCache,
    probe: Probe,
    model: Any,
    tokenizer: Any,
    parent: tuple[dict[str, Any], Mapping[str, torch.Tensor]],
    on_token: Callable[[int, int], None] | None = None,
) -> References:
    """Parent's and lineage base's numbers on the probe, from the cache where measured before.

    ``parent`` is the parent's (manifest, weights). A number not cached yet is measured with
    ``model`` (the round's model, fine-tuned by now) holding those weights for the while, and
    cached: no second model is loaded unless the base's files do not fit the model."""
    manifest, weights = parent
    parent_stats = cache.get(manifest, probe)
    if parent_stats is None:
        with swapped_in(model, weights):
            parent_stats = cache.measure(model, tokenizer, manifest, probe, on_token)
    base: DiversityStats | None = None
    root = registry.lineage_root(db, lineage)
    if root is not None and weights_key(root.manifest) == weights_key(manifest):
        base = parent_stats
    elif root is not None:
        base = cache.get(root.manifest, probe)
        if base is None:
            try:
                base = _measure_base(cache, probe, model, tokenizer, root, on_token)
            except Exception as e:  # the base's files are gone: check against the parent only
                log.warning("lineage %s: base v%d unusable (%s)", lineage, root.version, e)
    return References(parent=parent_stats, base=base)


def _measure_base(
    cache: DiversityCache,
    probe: Probe,
    model: Any,
    tokenizer: Any,
    root: registry.CheckpointRef,
    on_token: Callable[[int, int], None] | None,
) -> DiversityStats:
    verify_checkpoint(Path(root.path), root.manifest)
    files = FileWeights.of_checkpoint(Path(root.path))
    if compatible(model, files):
        with swapped_in(model, files):
            return cache.measure(model, tokenizer, root.manifest, probe, on_token)
    loaded = registry.open(root, model.device, torch.float32)
    try:
        return cache.measure(loaded.model, loaded.tokenizer, root.manifest, probe, on_token)
    finally:
        del loaded


def check_diversity(
    refs: References,
    probe: Probe,
    candidate: Any,
    tokenizer: Any,
    tolerances: tuple[float, float],
    on_token: Callable[[int, int], None] | None = None,
    real: tuple[DiversityStats, float] | None = None,
) -> DiversityCheck:
    """The candidate, as it stands, on the probe against ``refs``; ``tolerances`` is
    (absolute vs the parent, relative vs the base); ``on_token`` sees the probe's tokens;
    ``real`` is real held-out text's numbers at the probe's size and their tolerance
    (:mod:`worker.rounds.realtext`)."""
    check = DiversityCheck(
        parent=refs.parent,
        candidate=probe.run(candidate, tokenizer, on_token),
        tolerance=tolerances[0],
        base=refs.base,
        base_tolerance=tolerances[1],
        probe_size=len(probe.prompts),
    )
    if real is not None:  # real held-out text's numbers (worker/rounds/realtext.py)
        check = dataclasses.replace(check, real=real[0], real_tolerance=real[1])
    return check


def largest_diverse_step(
    ms: MetaStepResult,
    parent_state: Mapping[str, torch.Tensor],
    candidate: Any,
    parent_dev_ppl: float,
    margin: float,
    check: Callable[[], DiversityCheck],
    record: Callable[[dict[str, float]], None],
    confirm: Callable[[], DiversityCheck] | None = None,
) -> tuple[Decision, DiversityCheck, float]:
    """The largest dev gain whose diversity holds: ε from best dev perplexity down, until one
    passes or the gain falls under the margin. A smaller ε keeps the candidate closer to its
    parent, so a step whose full size loses diversity can still be taken in part.

    ``candidate`` holds the meta-step's ε on entry and the returned ε on exit; ``check``
    measures its diversity as it stands; ``record`` stores each ε's numbers. With
    ``confirm`` (the confirmation probe's check, same tolerances) an ε that passes ``check``
    is measured again and taken only if it passes there too; one that fails is passed over
    as a failed ``check`` is. The returned check is always ``check``'s."""
    assert ms.delta is not None, "meta_step(..., keep_delta=True) is needed"
    current = ms.epsilon
    tried: list[str] = []
    unconfirmed: list[str] = []
    for eps in ms.ranked():
        if eps != current:
            interpolate_into(candidate, parent_state, ms.delta, eps)
            current = eps
        div = check()
        verdict = decide("dev", parent_dev_ppl, ms.scores[eps], margin, div)
        record(
            {
                mn.diversity_ok_at(eps): float(not div.failures()),
                mn.candidate_distinct_2_at(eps): div.candidate.distinct_2,
                mn.candidate_repetition_rate_at(eps): div.candidate.repetition_rate,
            }
        )
        if verdict.promote and confirm is not None:
            second = confirm()
            record(
                {
                    mn.confirm_ok_at(eps): float(not second.failures()),
                    mn.candidate_distinct_2_confirm_at(eps): second.candidate.distinct_2,
                    mn.candidate_repetition_rate_confirm_at(eps): second.candidate.repetition_rate,
                }
            )
            if second.failures():  # rejected on the confirmation probe's numbers: next ε
                verdict = decide("dev", parent_dev_ppl, ms.scores[eps], margin, second)
                unconfirmed.append(f"ε={eps:g}")
                continue
        if verdict.promote or verdict.improvement < margin:
            break
        tried.append(f"ε={eps:g}")
    notes = [f"diversity failed at {', '.join(tried)}"] if tried and verdict.promote else []
    if unconfirmed:
        notes.append(f"confirmation failed at {', '.join(unconfirmed)}")
    note = f" ({'; '.join(notes)})" if notes else ""
    reason = verdict.reason.replace(":", f" at ε={current:g}{note}:", 1)
    return Decision(verdict.promote, reason, verdict.improvement), div, current
