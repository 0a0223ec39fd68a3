"""Decide stage: promote only on a measured improvement that keeps diversity."""

from __future__ import annotations

from dataclasses import dataclass

from selflm.rounds.textstats import DiversityStats


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    improvement: float  # relative perplexity improvement on the gate set (positive = better)


def decide(
    gate_name: str,
    champion_ppl: float,
    candidate_ppl: float,
    margin: float,
    champion_div: DiversityStats | None,
    candidate_div: DiversityStats | None,
    tolerance: float,
) -> Decision:
    """Promote when the gate perplexity improves by at least `margin` (relative) and the
    candidate's distinct-2 does not drop, nor its repetition rate rise, by more than
    `tolerance` (absolute: both are fractions in [0, 1], and a relative bound on a
    repetition rate near zero would reject any change)."""
    improvement = (champion_ppl - candidate_ppl) / champion_ppl if champion_ppl > 0 else 0.0
    numbers = (
        f"{gate_name} ppl {champion_ppl:.4f} -> {candidate_ppl:.4f} "
        f"({improvement * 100:+.2f}%, margin {margin * 100:.2f}%)"
    )
    if improvement < margin:
        return Decision(False, f"rejected: {numbers}", improvement)
    if champion_div is not None and candidate_div is not None:
        d2_floor = champion_div.distinct_2 - tolerance
        rep_ceiling = champion_div.repetition_rate + tolerance
        div = (
            f"distinct-2 {champion_div.distinct_2:.3f} -> {candidate_div.distinct_2:.3f}, "
            f"repetition {champion_div.repetition_rate:.3f} -> "
            f"{candidate_div.repetition_rate:.3f} (tolerance {tolerance:.3f})"
        )
        if candidate_div.distinct_2 < d2_floor or candidate_div.repetition_rate > rep_ceiling:
            return Decision(False, f"rejected: diversity fell: {div}; {numbers}", improvement)
        numbers = f"{numbers}; {div}"
    return Decision(True, f"promoted: {numbers}", improvement)
