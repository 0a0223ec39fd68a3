from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.modeling.loader import tiny_model
from worker.rounds.decide import Decision, DiversityCheck, decide
from worker.rounds.diversity_gate import SAMPLE_SEED, DiversityCache, Probe, weights_key
from worker.rounds.textstats import DiversityStats

BASE = DiversityStats(distinct_1=0.3, distinct_2=0.75, repetition_rate=0.06)


def stats(d2: float, rep: float) -> DiversityStats:
    return DiversityStats(distinct_1=0.3, distinct_2=d2, repetition_rate=rep)


def check(
    parent: DiversityStats, cand: DiversityStats, base: DiversityStats | None = BASE
) -> DiversityCheck:
    return DiversityCheck(parent=parent, candidate=cand, tolerance=0.05, base=base)


def test_margin_decides_first() -> None:
    d = decide("dev", 20.0, 19.95, 0.005, None)
    assert not d.promote and d.improvement == pytest.approx(0.0025)
    assert "20.0000 -> 19.9500" in d.reason
    assert decide("dev", 20.0, 19.0, 0.005, None).promote


def test_candidate_within_both_tolerances_is_promoted() -> None:
    d = decide("dev", 20.0, 19.0, 0.005, check(stats(0.74, 0.07), stats(0.73, 0.065)))
    assert d.promote, d.reason
    assert "base 0.750 / 0.060" in d.reason


def test_drift_within_the_parent_tolerance_is_caught_against_the_base() -> None:
    # Each step is within 0.05 of the parent, but the sum has left the base's 5% band.
    parent = stats(0.72, 0.09)
    cand = stats(0.70, 0.10)
    assert decide("dev", 20.0, 19.0, 0.005, check(parent, cand, base=None)).promote
    d = decide("dev", 20.0, 19.0, 0.005, check(parent, cand))
    assert not d.promote
    assert "below the base's" in d.reason and "above the base's" in d.reason


def test_repetition_near_zero_gets_an_absolute_floor() -> None:
    base = stats(0.75, 0.0)
    assert decide("dev", 20, 19, 0.0, check(base, stats(0.75, 0.034), base=base)).promote
    assert not decide("dev", 20, 19, 0.0, check(base, stats(0.75, 0.036), base=base)).promote


def test_distinct_2_has_a_noise_floor_against_the_base() -> None:
    base = stats(0.56, 0.07)  # the 128-prompt probe's level: 5% would be 0.028, under its noise
    assert decide("dev", 20, 19, 0.0, check(base, stats(0.52, 0.07), base=base)).promote
    assert not decide("dev", 20, 19, 0.0, check(base, stats(0.51, 0.07), base=base)).promote


def test_sudden_drop_against_the_parent_is_rejected() -> None:
    d = decide("dev", 20.0, 19.0, 0.0, check(stats(0.90, 0.0), stats(0.80, 0.0)))
    assert not d.promote and "below the parent's" in d.reason


def test_probe_is_fixed_and_cache_is_keyed_by_weights(tmp_path: Path) -> None:
    train = [f"Document {i} about the for statement and loops in Python." for i in range(20)]
    a = Probe.from_train(train, 4, 6, 0.8, 0.95, 4)
    b = Probe.from_train(train, 4, 6, 0.8, 0.95, 2)
    assert a.prompts == b.prompts and a.key() == b.key()  # batch size does not change numbers
    assert Probe.from_train(train, 4, 8, 0.8, 0.95, 4).key() != a.key()

    loaded = tiny_model("llama", seed=0)
    model, tok = loaded.model, loaded.tokenizer
    first = a.run(model, tok)
    assert first == b.run(model, tok)  # deterministic whatever the batch size

    cache = DiversityCache(tmp_path / "default")
    m1 = {"files": {"model.safetensors": "aa"}}
    m2 = {"files": {"model.safetensors": "bb"}}
    assert cache.get(m1, a) is None
    assert cache.measure(model, tok, m1, a) == first
    fake = stats(0.5, 0.5)
    cache.put(m2, a, fake)
    assert cache.measure(model, tok, m2, a) == fake  # served from the cache, not measured
    on_disk = json.loads((tmp_path / "default" / "diversity.json").read_text())
    assert set(on_disk) == {f"{weights_key(m1)}:{a.key()}", f"{weights_key(m2)}:{a.key()}"}
    (tmp_path / "default" / "diversity.json").write_text("{not json")
    assert cache.get(m1, a) is None  # a damaged cache is re-measured, not an error


def test_a_per_round_probe_is_the_rounds_own_and_reproducible() -> None:
    train = [f"Document {i} about the for statement and loops in Python." for i in range(40)]
    fixed = Probe.from_train(train, 4, 6, 0.8, 0.95, 4)
    one = Probe.from_train(train, 4, 6, 0.8, 0.95, 4, round_seed=1)
    assert one == Probe.from_train(train, 4, 6, 0.8, 0.95, 4, round_seed=1)
    two = Probe.from_train(train, 4, 6, 0.8, 0.95, 4, round_seed=2)
    assert (
        fixed.sample_seed == SAMPLE_SEED
        and fixed.prompts == Probe.from_train(train, 4, 6, 0.8, 0.95, 4, round_seed=None).prompts
    )
    assert len({fixed.sample_seed, one.sample_seed, two.sample_seed}) == 3
    assert len({fixed.prompts, one.prompts, two.prompts}) == 3
    assert len({fixed.key(), one.key(), two.key()}) == 3
    # Round seed 0 is a round's own probe too, not the fixed one.
    assert Probe.from_train(train, 4, 6, 0.8, 0.95, 4, round_seed=0).key() != fixed.key()


def test_a_larger_probe_has_tighter_base_floors_and_a_smaller_one_no_looser() -> None:
    base = stats(0.548, 0.087)  # the bundled model's numbers on the gate's probe
    # 0.035 below the base (6.4 %): inside the 128-prompt floor (0.045), outside 256's (0.032)
    cand = stats(0.513, 0.087)

    def fails(n: int, c: DiversityStats = cand) -> list[str]:
        return DiversityCheck(base, c, tolerance=0.05, base=base, probe_size=n).failures()

    assert fails(128) == [] and fails(24) == []
    assert fails(256) == ["distinct-2 fell more than 5% (at least 0.0318) below the base's"]
    # repetition: +0.03 is inside 128's floor (0.035), outside 256's (0.0247)
    worse = stats(0.548, 0.117)
    assert fails(128, worse) == [] and fails(24, worse) == []
    assert fails(256, worse) == ["repetition rose more than 5% (at least 0.0247) above the base's"]


def test_the_gate_check_carries_its_probes_size() -> None:
    from worker.rounds.diversity_gate import References, check_diversity

    train = [f"Document {i} about the for statement and loops in Python." for i in range(40)]
    loaded = tiny_model("llama", seed=0)
    for n in (3, 5):
        probe = Probe.from_train(train, n, 4, 0.8, 0.95, 8)
        refs = References(parent=BASE, base=BASE)
        div = check_diversity(refs, probe, loaded.model, loaded.tokenizer, (0.05, 0.05))
        assert div.probe_size == n


def test_the_confirmation_probe_is_another_draw_and_reproducible() -> None:
    from worker.rounds.diversity_gate import (
        CONFIRM_PROMPT_SEED,
        CONFIRM_SAMPLE_SEED,
        PROMPT_SEED,
        probe_seeds,
    )

    train = [f"Document {i} about the for statement and loops in Python." for i in range(40)]
    assert probe_seeds(None) == (PROMPT_SEED, SAMPLE_SEED)  # the main probe is unchanged
    assert probe_seeds(None, confirm=True) == (CONFIRM_PROMPT_SEED, CONFIRM_SAMPLE_SEED)
    keys = set()
    for round_seed in (None, 0, 1, 2):  # "fixed", and per_round for three rounds
        main = Probe.from_train(train, 4, 6, 0.8, 0.95, 4, round_seed=round_seed)
        conf = Probe.from_train(train, 4, 6, 0.8, 0.95, 4, round_seed=round_seed, confirm=True)
        # The same draw whenever the round is run again...
        assert conf == Probe.from_train(train, 4, 6, 0.8, 0.95, 4, round_seed, confirm=True)
        # ...of other prompts with another sampling seed, at the main probe's settings.
        assert conf.prompts != main.prompts and conf.sample_seed != main.sample_seed
        assert len(conf.prompts) == len(main.prompts)
        assert (conf.max_new_tokens, conf.temperature, conf.top_p) == (6, 0.8, 0.95)
        assert probe_seeds(round_seed) != probe_seeds(round_seed, confirm=True)
        keys |= {main.key(), conf.key()}
    assert len(keys) == 8  # no probe is another's under a different name


def _walk(
    scores: dict[float, float],
    main_fails: set[float],
    confirm_fails: set[float] | None,
) -> tuple[Decision, float, dict[str, float], list[tuple[str, float]], float]:
    """``largest_diverse_step`` on a one-weight "model" whose weight is ε (parent 0, delta 1):
    the checks read the ε the candidate holds and fail where told. Returns the decision, the
    ε taken, the recorded metrics, the checks run in order and the weight the model holds."""
    import torch

    from worker.rounds.diversity_gate import largest_diverse_step
    from worker.rounds.metastep import MetaStepResult

    model = torch.nn.Linear(1, 1, bias=False)
    parent = {"weight": torch.zeros(1, 1)}
    best = min(scores, key=scores.__getitem__)  # the meta-step's ε
    ms = MetaStepResult(best, scores, delta={"weight": torch.ones(1, 1, dtype=torch.float64)})
    with torch.no_grad():
        model.weight.fill_(ms.epsilon)
    parent_stats, bad = stats(0.75, 0.06), stats(0.60, 0.06)
    calls: list[tuple[str, float]] = []

    def measured(which: str, fails: set[float]) -> DiversityCheck:
        eps = float(model.weight.item())
        calls.append((which, eps))
        return check(parent_stats, bad if eps in fails else parent_stats)

    recorded: dict[str, float] = {}
    decision, _, eps = largest_diverse_step(
        ms,
        parent,
        model,
        20.0,
        0.005,
        lambda: measured("main", main_fails),
        recorded.update,
        None if confirm_fails is None else lambda: measured("confirm", confirm_fails),
    )
    return decision, eps, recorded, calls, float(model.weight.item())


def test_an_eps_that_fails_confirmation_is_passed_over_for_the_next() -> None:
    scores = {0.25: 19.0, 0.5: 18.5, 1.0: 18.0}  # best dev perplexity at ε = 1
    # Without confirmation ε = 1 passes its probe and is promoted.
    plain, eps, rec, calls, _ = _walk(scores, set(), None)
    assert plain.promote and eps == 1.0 and calls == [("main", 1.0)]
    assert not any("confirm" in k for k in rec) and "confirmation" not in plain.reason
    # With it, ε = 1 passes its probe but not the confirmation: the walk goes on to ε = 0.5,
    # which passes both, and leaves the candidate there.
    d, eps, rec, calls, held = _walk(scores, set(), {1.0})
    assert d.promote and eps == 0.5 == held, d.reason
    assert calls == [("main", 1.0), ("confirm", 1.0), ("main", 0.5), ("confirm", 0.5)]
    assert d.reason.startswith("promoted at ε=0.5 (confirmation failed at ε=1):"), d.reason
    assert rec["diversity_ok_eps_1"] == 1.0 and rec["confirm_ok_eps_1"] == 0.0
    assert rec["candidate_distinct_2_confirm_eps_1"] == 0.60
    assert rec["confirm_ok_eps_0.5"] == 1.0 and rec["candidate_distinct_2_confirm_eps_0.5"] == 0.75
    assert "candidate_repetition_rate_confirm_eps_0.5" in rec and "confirm_ok_eps_0.25" not in rec


def test_confirmation_runs_only_on_a_passing_eps_and_can_reject_them_all() -> None:
    scores = {0.25: 19.0, 0.5: 18.5, 1.0: 18.0}
    # ε = 1 fails its own probe (no confirmation run), ε = 0.5 fails confirmation, 0.25 passes.
    d, eps, rec, calls, _ = _walk(scores, {1.0}, {0.5})
    assert d.promote and eps == 0.25, d.reason
    assert calls == [("main", 1.0), ("main", 0.5), ("confirm", 0.5), ("main", 0.25),
                     ("confirm", 0.25)]  # fmt: skip
    assert "confirm_ok_eps_1" not in rec
    assert "(diversity failed at ε=1; confirmation failed at ε=0.5)" in d.reason
    # Every ε fails confirmation: rejected on the last one's confirmation numbers.
    d, eps, rec, calls, held = _walk(scores, set(), {0.25, 0.5, 1.0})
    assert not d.promote and eps == 0.25 == held
    assert d.reason.startswith(
        "rejected at ε=0.25 (confirmation failed at ε=1, ε=0.5, ε=0.25): distinct-2 fell"
    ), d.reason
    assert [rec[f"confirm_ok_eps_{e:g}"] for e in (1.0, 0.5, 0.25)] == [0.0, 0.0, 0.0]
