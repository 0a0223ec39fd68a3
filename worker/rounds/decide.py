"""Decide stage: promote only on a measured improvement that keeps diversity."""

from __future__ import annotations

from dataclasses import dataclass

from worker.rounds.textstats import DiversityStats

# Noise floors of the base check (absolute): two standard errors of a candidate-minus-base
# difference on the default 128-prompt probe, from its seed noise (bench/probe_noise.py,
# docs/bench/probe_noise.json: SE 0.021 for distinct-2, 0.017 for repetition). Below them a
# same-quality candidate fails on chance; the repetition floor also gives slack near zero,
# where a relative bound would reject any change.
REPETITION_FLOOR = 0.035
DISTINCT_2_FLOOR = 0.045
FLOOR_PROBE = 128  # the probe size the floors were measured at


def base_floors(probe_size: int) -> tuple[float, float]:
    """(distinct-2, repetition) floors of the base check for a probe of ``probe_size``
    prompts: the noise of a difference falls as 1/sqrt(prompts), so a larger probe's floors
    do too; a smaller probe keeps the 128-prompt floors (it is not allowed looser ones)."""
    scale = (FLOOR_PROBE / max(probe_size, FLOOR_PROBE)) ** 0.5
    return DISTINCT_2_FLOOR * scale, REPETITION_FLOOR * scale


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
    real: DiversityStats | None = None  # real held-out text of the probe's size (realtext)
    real_tolerance: float = 0.045  # absolute, on the distance from real text (see real_failures)
    probe_size: int = FLOOR_PROBE  # prompts in the probe: sets the base check's floors

    def real_failures(self) -> list[str]:
        """The candidate's samples may not sit farther from real held-out domain text than
        the base's do (the parent's when the base is unknown) by more than ``real_tolerance``,
        on distinct-2 or on trigram repetition, in either direction: too repetitive, or too
        scattered (word salad has a high distinct-2 and no repetition, which the one-sided
        parent and base checks would read as more diverse)."""
        if self.real is None:
            return []
        ref, r, t, out = self.base or self.parent, self.real, self.real_tolerance, []
        for name, cv, bv, rv in (
            ("distinct-2", self.candidate.distinct_2, ref.distinct_2, r.distinct_2),
            ("repetition", self.candidate.repetition_rate, ref.repetition_rate, r.repetition_rate),
        ):
            if abs(cv - rv) > abs(bv - rv) + t:
                side = "below" if cv < rv else "above"
                out.append(
                    f"{name} {cv:.3f} is {abs(cv - rv):.3f} {side} real held-out text's "
                    f"{rv:.3f}, more than the {'base' if self.base else 'parent'}'s gap "
                    f"{abs(bv - rv):.3f} + {t:.3f}"
                )
        return out

    def failures(self) -> list[str]:
        c, p, out = self.candidate, self.parent, []
        if c.distinct_2 < p.distinct_2 - self.tolerance:
            out.append(f"distinct-2 fell more than {self.tolerance:.3f} below the parent's")
        if c.repetition_rate > p.repetition_rate + self.tolerance:
            out.append(f"repetition rose more than {self.tolerance:.3f} above the parent's")
        if self.base is not None:
            b, t = self.base, self.base_tolerance
            d2_floor, rep_floor = base_floors(self.probe_size)
            if c.distinct_2 < b.distinct_2 - max(t * b.distinct_2, d2_floor):
                out.append(
                    f"distinct-2 fell more than {t:.0%} (at least {d2_floor:.3g}) below the base's"
                )
            if c.repetition_rate > b.repetition_rate + max(t * b.repetition_rate, rep_floor):
                out.append(
                    f"repetition rose more than {t:.0%} (at least {rep_floor:.3g}) above the base's"
                )
        return out + self.real_failures()

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
        if self.real is not None:
            text += (
                f" (real text {self.real.distinct_2:.3f} / {self.real.repetition_rate:.3f}, "
                f"tolerance {self.real_tolerance:.3f})"
            )
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
