"""The numbers of the quality report: relative changes, formatting, each arm's summary
against the issue's targets."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# The targets for the selflm arm after N rounds (relative to the base model).
TEST_GAIN = 0.05  # test ppl at least 5% lower
UNRELATED_SLACK = 0.02  # unrelated ppl at most 2% higher
DIVERSITY_BAND = 0.05  # distinct-2 within 5% of the base's
# Repetition: within NOISE_SE standard errors of the probe's own sampling noise (the spread of
# the whole-probe statistic over sampling seeds on one checkpoint, docs/quality/probe_noise.json);
# without a noise measurement for the probe in use, within DIVERSITY_BAND relative.
NOISE_SE = 2.0
BASELINE_ARM = "real_only"  # the target arm must beat it on test at the same real-token budget

ARM_NOTES = {
    "reference": "the reference article's loop (see below)",
    "selflm": "the round defaults until session 10 (diversity selection)",
    "real_only": "update on real replay text only, as many real tokens as selflm used",
    "real_only_matched": "update on real replay text only, as many tokens as selflm trains on",
    "served": "prompts from recorded POST /generate traffic (a fixed question stream)",
    "old_gate": "issue 6's gate: a 24-prompt probe, no real-text check",
    "kl_anchor": "KL anchor to the lineage base on replay text",
    "no_replay": "defaults without real replay text",
    "no_filters": "defaults without the degenerate/duplicate filters",
    "no_meta_step": "defaults with ε fixed at 1 (no interpolation)",
    "random": "defaults with random selection",
    "diversity": "defaults with diversity selection (as selflm)",
    "difficulty": "selflm with difficulty selection: the round defaults since session 10",
    "per_round_probe": "difficulty with the gate's probe drawn afresh from each round's seed",
    "probe_256": "difficulty with a 256-prompt gate probe and its tighter noise floors",
    "confirm_probe": "difficulty with each passing ε confirmed on a second, independent probe",
}


# --------------------------------------------------------------------------- numbers


def num(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return float(value)  # "inf" as written by the study for an overflowed ppl
        except ValueError:
            return None
    return float(value)


def rel(value: Any, base: Any) -> float | None:
    v, b = num(value), num(base)
    if v is not None and v == b == 0:
        return 0.0
    if v is None or b is None or b == 0 or not math.isfinite(v) or not math.isfinite(b):
        return None
    return v / b - 1.0


def fmt(value: Any, digits: int = 3) -> str:
    v = num(value)
    if v is None:
        return "–"
    if not math.isfinite(v):
        return "∞" if v > 0 else "NaN"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:+.2f}%"


@dataclass
class ArmSummary:
    arm: str
    rounds: int
    promotions: int
    failed: int
    base: dict[str, Any]
    final: dict[str, Any]
    test_change: float | None
    unrelated_change: float | None
    distinct2_change: float | None
    repetition_change: float | None
    worse_than_parent: list[tuple[int, float]]  # (round, relative test-ppl increase)
    repetition_band: float | None = None  # absolute, NOISE_SE standard errors of the probe
    baseline_test_ppl: float | None = None  # BASELINE_ARM's test ppl at the same round
    decisions_checked: int = 0
    decisions_mismatched: list[int] | None = None  # rounds whose decision does not replay

    @property
    def checks(self) -> list[tuple[str, str, bool | None, str]]:
        """(target, value, met, gap) for the issue's four targets."""

        def check(change: float | None, ok: bool, miss: str) -> tuple[bool | None, str]:
            if change is None:
                return None, "no number"
            return ok, "" if ok else miss

        out: list[tuple[str, str, bool | None, str]] = []
        t = self.test_change
        met, gap = check(
            t,
            t is not None and t <= -TEST_GAIN,
            f"missed by {(t or 0) * 100 + TEST_GAIN * 100:.2f} points",
        )
        out.append(("test-split ppl ≥ 5% below base", pct(t), met, gap))
        u = self.unrelated_change
        met, gap = check(
            u,
            u is not None and u <= UNRELATED_SLACK,
            f"over by {(u or 0) * 100 - UNRELATED_SLACK * 100:.2f} points",
        )
        out.append(("unrelated ppl ≤ 2% above base", pct(u), met, gap))
        if self.baseline_test_ppl is not None:
            mine, theirs = num(self.final.get("test_ppl")), self.baseline_test_ppl
            r = rel(mine, theirs)
            met, gap = check(r, r is not None and r < 0, f"{pct(r)} vs {BASELINE_ARM}")
            out.append(
                (
                    f"test ppl below {BASELINE_ARM} (same real-token budget)",
                    f"{fmt(mine)} vs {fmt(theirs)} ({pct(r)})",
                    met,
                    gap,
                )
            )
        d2 = self.distinct2_change
        met, gap = check(
            d2,
            d2 is not None and abs(d2) <= DIVERSITY_BAND,
            f"outside by {abs(d2 or 0) * 100 - DIVERSITY_BAND * 100:.2f} points",
        )
        out.append(("distinct-2 within ±5% of base", pct(d2), met, gap))
        rep_base, rep_final = (
            num(self.base.get("repetition_rate")),
            num(self.final.get("repetition_rate")),
        )
        if self.repetition_band is not None and rep_base is not None and rep_final is not None:
            diff = rep_final - rep_base
            ok = abs(diff) <= self.repetition_band
            out.append(
                (
                    f"repetition within ±{NOISE_SE:g} SE of the probe's noise "
                    f"(±{self.repetition_band:.4f})",
                    f"{diff:+.4f} ({pct(self.repetition_change)})",
                    ok,
                    "" if ok else f"outside by {abs(diff) - self.repetition_band:.4f}",
                )
            )
        else:
            c = self.repetition_change
            met, gap = check(
                c,
                c is not None and abs(c) <= DIVERSITY_BAND,
                f"outside by {abs(c or 0) * 100 - DIVERSITY_BAND * 100:.2f} points",
            )
            out.append(
                ("repetition rate within ±5% of base (no probe-noise file)", pct(c), met, gap)
            )
        worst = max((w for _, w in self.worse_than_parent), default=None)
        ok = not self.worse_than_parent
        detail = ", ".join(f"round {r} ({w * 100:+.2f}%)" for r, w in self.worse_than_parent)
        out.append(
            (
                "no promoted version worse on test than its parent",
                f"{len(self.worse_than_parent)} of {self.promotions} promotions worse",
                ok,
                "" if ok else f"worst {pct(worst)}: {detail}",
            )
        )
        bad = self.decisions_mismatched or []
        out.append(
            (
                "every decision reproducible from its recorded metrics",
                f"{self.decisions_checked - len(bad)} of {self.decisions_checked} rounds",
                not bad if self.decisions_checked else None,
                "" if not bad else "rounds " + ", ".join(map(str, bad)),
            )
        )
        return out


def replay_decision(rec: dict[str, Any], margin: float) -> bool | None:
    """The decision the round's recorded metrics imply for a dev-gated round: promote iff the
    gate ppl at the decided ε beats the champion's dev ppl by the margin and diversity held
    there (on the confirmation probe too, where ``diversity_confirm`` recorded one); None
    when the metrics needed are not recorded (e.g. the generated gate)."""
    m = rec.get("round_metrics") or {}
    eps = num(m.get("decide.epsilon"))
    champ = num(m.get("evaluate.champion_dev_ppl"))
    if eps is None or champ is None or champ <= 0:
        return None
    cand = num(m.get(f"meta_step.gate_ppl_eps_{eps:g}"))
    if cand is None:
        cand = num(m.get("evaluate.candidate_dev_ppl"))
    if cand is None:
        return None
    improvement = (champ - cand) / champ
    ok = m.get(f"decide.diversity_ok_eps_{eps:g}")
    diversity_ok = True if ok is None else bool(num(ok))
    confirmed = m.get(f"decide.confirm_ok_eps_{eps:g}")
    confirm_ok = True if confirmed is None else bool(num(confirmed))
    return improvement >= margin and diversity_ok and confirm_ok


def repetition_band(noise: dict[str, Any] | None, measure: dict[str, Any]) -> float | None:
    """NOISE_SE × the probe's repetition SD, if ``noise`` was measured on the probe in use."""
    if not noise:
        return None
    same = noise.get("prompts") == measure.get("diversity_prompts") and noise.get(
        "max_new_tokens"
    ) == measure.get("max_new_tokens")
    sd = num(noise.get("repetition_sd"))
    return NOISE_SE * sd if same and sd is not None else None


def summarize(
    arm: str,
    recs: list[dict[str, Any]],
    params: dict[str, Any] | None = None,
    band: float | None = None,
    baseline: list[dict[str, Any]] | None = None,
) -> ArmSummary | None:
    by_round = {r["round"]: r for r in recs}
    if 0 not in by_round:
        return None
    base = by_round[0]
    last = max(by_round)
    final = by_round[last]
    worse: list[tuple[int, float]] = []
    for i in sorted(by_round):
        if i == 0 or not by_round[i].get("promoted") or i - 1 not in by_round:
            continue
        change = rel(by_round[i].get("test_ppl"), by_round[i - 1].get("test_ppl"))
        if change is not None and change > 0:
            worse.append((i, change))
    rounds = [r for i, r in by_round.items() if i > 0]
    params = params or {}
    checked, mismatched = 0, []
    if params.get("gate", "dev") == "dev":
        margin = float(params.get("promotion_margin", 0.0))
        for r in sorted(rounds, key=lambda r: r["round"]):
            if r.get("status") != "succeeded":
                continue
            expected = replay_decision(r, margin)
            if expected is None:
                continue
            checked += 1
            if expected != bool(r.get("promoted")):
                mismatched.append(r["round"])
    base_line = {r["round"]: r for r in baseline or []}
    theirs = base_line.get(last)
    return ArmSummary(
        arm=arm,
        rounds=last,
        promotions=sum(1 for r in rounds if r.get("promoted")),
        failed=sum(1 for r in rounds if r.get("status") == "failed"),
        base=base,
        final=final,
        test_change=rel(final.get("test_ppl"), base.get("test_ppl")),
        unrelated_change=rel(final.get("unrelated_ppl"), base.get("unrelated_ppl")),
        distinct2_change=rel(final.get("distinct_2"), base.get("distinct_2")),
        repetition_change=rel(final.get("repetition_rate"), base.get("repetition_rate")),
        worse_than_parent=worse,
        repetition_band=band,
        baseline_test_ppl=num(theirs.get("test_ppl")) if theirs and baseline is not None else None,
        decisions_checked=checked,
        decisions_mismatched=mismatched,
    )


def arms_in_order(data: dict[str, Any]) -> list[str]:
    order = list(data.get("meta", {}).get("arm_order", []))
    for r in data.get("records", []):
        if r["arm"] not in order:
            order.append(r["arm"])
    return [a for a in order if any(r["arm"] == a for r in data.get("records", []))]
