"""A round records its memory per stage, and its numbers match the unchunked, in-RAM round.

Real round code (``run_round``) on SQLite and tiny:llama, in process, twice on fresh stores:
once as it runs, once with the LM head unchunked, whole batches and the parent's weights as
a copy in RAM (the round before the memory work). The decision is reproducible from either.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core import metric_names as mn
from core.db import rounds as records
from core.db.session import Database, upgrade
from core.modeling.device import cpu_has_fast_bf16
from core.registry import ensure_base_checkpoint
from core.settings import Settings
from worker.rounds import lm_loss, stages
from worker.rounds.metastep import state_copy
from worker.rounds.pipeline import run_round
from worker.rounds.weights_file import FileWeights

PARAMS: dict[str, Any] = {
    "num_prompts": 4,
    "samples_per_prompt": 3,
    "max_new_tokens": 16,
    "min_words": 3,
    "train_size": 6,
    "valid_size": 3,
    "eval_passages": 6,
    "diversity_prompts": 3,
    "epochs": 2,
    "batch_size": 4,
    "max_length": 48,
    "replay_fraction": 0.8,
    "learning_rate": 3e-3,
    "diversity_tolerance": 1.0,
    "base_diversity_tolerance": 1.0,
}


def _round(settings: Settings) -> tuple[str, dict[str, dict[str, Any]]]:
    upgrade(settings.database_url)
    db = Database(settings.database_url)
    try:
        ensure_base_checkpoint(settings, db)
        row = records.create_round(db, settings.lineage, PARAMS)
        outcome = run_round(settings, db, row.id)
        assert outcome is not None
        done = records.get_round(db, row.id)
        assert done is not None
        return outcome.decision, records.metrics_dict(done)
    finally:
        db.dispose()


def test_round_memory_metrics_and_numbers_match_the_in_ram_round(
    tmp_path: Path,
    make_tiny_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sources: list[type] = []
    real = stages.parent_weights

    def spy(champion: Any, model: Any) -> Any:
        got = real(champion, model)
        sources.append(type(got))
        return got

    monkeypatch.setattr(stages, "parent_weights", spy)
    decision, m = _round(make_tiny_settings(tmp_path / "new"))
    assert sources == [FileWeights], "the parent's weights are read from its files"

    peaks = {s: m[s][mn.MEMORY] for s in (mn.DATA, *mn.STAGES)}
    assert all(v > 50 * 2**20 for v in peaks.values()), peaks  # a torch process, in bytes
    assert m[mn.ROUND][mn.MEMORY] == max(peaks.values())
    assert m[mn.UPDATE][mn.MEMORY] >= m[mn.SELECT][mn.MEMORY] * 0.9

    # The same round the way it ran before: full logits, whole batches, parent in RAM.
    monkeypatch.setattr(stages, "parent_weights", lambda _c, model: state_copy(model))
    monkeypatch.setattr(stages, "MICRO_BATCH_TOKENS", 0)
    with lm_loss.full_logits():
        ref_decision, ref = _round(make_tiny_settings(tmp_path / "ref"))

    assert decision == ref_decision
    assert m[mn.META_STEP][mn.EPSILON_CHOSEN] == ref[mn.META_STEP][mn.EPSILON_CHOSEN]
    assert m[mn.DECIDE][mn.EPSILON] == ref[mn.DECIDE][mn.EPSILON]
    # The champion's numbers are float32 scoring: equal to rounding. The candidate's went
    # through bf16-autocast training where the CPU has it, and the chunked head's weight
    # gradient is summed in float32 where the full-logits one is rounded to bf16 once: they
    # agree to bf16 noise: a few 1e-4 after two epochs at lr 3e-3 on an AMX CPU, 1.6e-3 on an
    # AVX512-BF16 one without AMX (AMD EPYC, session 11; the same at the commit before it).
    rel = 5e-3 if cpu_has_fast_bf16() else 1e-5
    for stage, names, tol in (
        (mn.EVALUATE, [mn.ppl("champion", s) for s in ("valid", "dev", "test")], 1e-5),
        (mn.EVALUATE, [mn.ppl("candidate", s) for s in ("valid", "dev", "test")], rel),
        (mn.META_STEP, [k for k in ref[mn.META_STEP] if k.startswith("gate_ppl_eps_")], rel),
    ):
        assert names
        for name in names:
            assert m[stage][name] == pytest.approx(ref[stage][name], rel=tol), (stage, name)
    # A relative gain (a difference of two such numbers): to the same noise, absolutely.
    assert m[mn.DECIDE][mn.IMPROVEMENT] == pytest.approx(ref[mn.DECIDE][mn.IMPROVEMENT], abs=rel)
