"""The numbers of the quality report: relative changes, formatting, each arm's summary
against the issue's targets."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# The targets for the selflm arm after N rounds (relative to the base model).
TEST_GAIN = 0.05  # test ppl at least 5% lower
UNRELATED_SLACK = 0.02  # unrelated ppl at most 2% higher
DIVERSITY_BAND = 0.05  # distinct-2 and repetition rate within 5% of the base's

ARM_NOTES = {
    "reference": "the reference article's loop (see below)",
    "selflm": "the round defaults",
    "no_replay": "defaults without real replay text",
    "no_filters": "defaults without the degenerate/duplicate filters",
    "no_meta_step": "defaults with ε fixed at 1 (no interpolation)",
    "random": "defaults with random selection",
    "diversity": "defaults with diversity selection",
    "difficulty": "defaults with difficulty selection",
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
        for name, change in (
            ("distinct-2 within ±5% of base", self.distinct2_change),
            ("repetition rate within ±5% of base", self.repetition_change),
        ):
            met, gap = check(
                change,
                change is not None and abs(change) <= DIVERSITY_BAND,
                f"outside by {abs(change or 0) * 100 - DIVERSITY_BAND * 100:.2f} points",
            )
            out.append((name, pct(change), met, gap))
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
        return out


def summarize(arm: str, recs: list[dict[str, Any]]) -> ArmSummary | None:
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
    )


def arms_in_order(data: dict[str, Any]) -> list[str]:
    order = list(data.get("meta", {}).get("arm_order", []))
    for r in data.get("records", []):
        if r["arm"] not in order:
            order.append(r["arm"])
    return [a for a in order if any(r["arm"] == a for r in data.get("records", []))]
