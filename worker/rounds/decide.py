"""Decide stage: promote only on a measured improvement that keeps diversity."""

from __future__ import annotations

from dataclasses import dataclass

from worker.rounds.textstats import DiversityStats

# Slack on a repetition rate near zero, where a relative bound would reject any change.
REPETITION_FLOOR = 0.01


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    improvement: float  # relative perplexity improvement on the gate set (positive = better)


@dataclass(frozen=True)
class DiversityCheck:
    """Diversity of parent, lineage base and candidate on the same fixed probe."""

    parent: DiversityStats
    candidate: DiversityStats
    tolerance: float  # absolute, against the parent
    base: DiversityStats | None = None
    base_tolerance: float = 0.05  # relative, against the lineage base

    def failures(self) -> list[str]:
        c, p, out = self.candidate, self.parent, []
        if c.distinct_2 < p.distinct_2 - self.tolerance:
            out.append(f"distinct-2 fell more than {self.tolerance:.3f} below the parent's")
        if c.repetition_rate > p.repetition_rate + self.tolerance:
            out.append(f"repetition rose more than {self.tolerance:.3f} above the parent's")
        if self.base is not None:
            b, t = self.base, self.base_tolerance
            if c.distinct_2 < b.distinct_2 * (1 - t):
                out.append(f"distinct-2 fell more than {t:.0%} below the base's")
            if c.repetition_rate > b.repetition_rate + max(t * b.repetition_rate, REPETITION_FLOOR):
                out.append(f"repetition rose more than {t:.0%} above the base's")
        return out

    def describe(self) -> str:
        c, p = self.candidate, self.parent
        text = (
            f"distinct-2 {p.distinct_2:.3f} -> {c.distinct_2:.3f}, "
            f"repetition {p.repetition_rate:.3f} -> {c.repetition_rate:.3f}"
        )
        if self.base is not None:
            text += (
                f" (base {self.base.distinct_2:.3f} / {self.base.repetition_rate:.3f}, "
                f"tolerance {self.tolerance:.3f} vs parent, {self.base_tolerance:.0%} vs base)"
            )
        else:
            text += f" (tolerance {self.tolerance:.3f})"
        return text


def decide(
    gate_name: str,
    champion_ppl: float,
    candidate_ppl: float,
    margin: float,
    div: DiversityCheck | None,
) -> Decision:
    """Promote when the gate perplexity improves by at least `margin` (relative) and, when
    `div` is given, the candidate's diversity stays within its tolerances: distinct-2 may not
    drop, nor the repetition rate rise, by more than `tolerance` (absolute: both are fractions
    in [0, 1]) against the parent, nor by more than `base_tolerance` (relative) against the
    lineage's base, so per-round drift cannot accumulate across rounds."""
    improvement = (champion_ppl - candidate_ppl) / champion_ppl if champion_ppl > 0 else 0.0
    numbers = (
        f"{gate_name} ppl {champion_ppl:.4f} -> {candidate_ppl:.4f} "
        f"({improvement * 100:+.2f}%, margin {margin * 100:.2f}%)"
    )
    if improvement < margin:
        return Decision(False, f"rejected: {numbers}", improvement)
    if div is not None:
        failed = div.failures()
        if failed:
            why = "; ".join(failed)
            return Decision(False, f"rejected: {why}: {div.describe()}; {numbers}", improvement)
        numbers = f"{numbers}; {div.describe()}"
    return Decision(True, f"promoted: {numbers}", improvement)
