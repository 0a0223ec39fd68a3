"""Write ``docs/quality.md`` (and its test-perplexity plot) from the study's ``results.json``.

    .venv/bin/python -m studies.quality.report [--results docs/quality/results.json]
                                             [--report docs/quality.md]

The plot (test-split perplexity and distinct-2 per round, every arm) goes beside the report
as ``<report stem>_rounds.png``. The probe's sampling noise, when measured
(``probe_noise.json`` beside ``results.json``, see ``studies.quality.noise``), sets the
repetition target's band. The section "What the
numbers say" is written by hand: its text between the two HTML markers survives every
regeneration of the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from studies.quality.arms import DEFAULT_ARM
from studies.quality.plot import plot_path_for, write_plot
from studies.quality.report_setup import setup_section, table
from studies.quality.summary import (
    BASELINE_ARM,
    ArmSummary,
    arms_in_order,
    fmt,
    num,
    pct,
    rel,
    repetition_band,
    summarize,
)

log = logging.getLogger("studies.quality.report")

NOTES_BEGIN = "<!-- BEGIN what-the-numbers-say (hand-written; kept when the report is rebuilt) -->"
NOTES_END = "<!-- END what-the-numbers-say -->"
NOTES_PLACEHOLDER = (
    "_Placeholder — the lead fills this in after the full run: which arms improved the test "
    "split and by how much, where the design does not help (which component made no "
    "difference or hurt), how the reference loop compares, and which round defaults changed "
    "because of it._"
)


# --------------------------------------------------------------------------- markdown


def _mark(met: bool | None) -> str:
    return "–" if met is None else ("met" if met else "**missed**")


def _existing_notes(report: Path) -> str | None:
    if not report.exists():
        return None
    text = report.read_text(encoding="utf-8")
    if NOTES_BEGIN in text and NOTES_END in text:
        inner = text.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0]
        return inner.strip("\n")
    return None


def summaries_of(data: dict[str, Any], noise: dict[str, Any] | None) -> dict[str, ArmSummary]:
    meta = data.get("meta", {})
    band = repetition_band(noise, meta.get("measure", {}))
    baseline = [r for r in data["records"] if r["arm"] == BASELINE_ARM]
    out: dict[str, ArmSummary] = {}
    for a in arms_in_order(data):
        params = meta.get("arms", {}).get(a, {}).get("params", {})
        recs = [r for r in data["records"] if r["arm"] == a]
        theirs = baseline if baseline and a != BASELINE_ARM else None
        s = summarize(a, recs, params, band, theirs)
        if s is not None:
            out[a] = s
    return out


GENERATED_ARMS = ("selflm", DEFAULT_ARM)  # arms whose updates train on generated samples


def _generated_vs_real(data: dict[str, Any]) -> list[str]:
    """The plain answer: did self-generated data beat real text alone at equal real data?"""
    lines = ["## Did self-generated data help?", ""]
    at = {(r["arm"], r["round"]): r for r in data["records"]}
    last = {a: max(i for (b, i) in at if b == a) for a in {b for b, _ in at}}
    rows = []
    for g in GENERATED_ARMS:
        for a in ("real_only", "real_only_matched"):
            if g not in last or a not in last:
                continue
            r = min(last[g], last[a])
            m, t = num(at[(g, r)].get("test_ppl")), num(at[(a, r)].get("test_ppl"))
            if r == 0 or m is None or t is None:
                continue
            change = rel(m, t)
            verdict = "**yes**" if change is not None and change < 0 else "**no**"
            rows.append([g, a, str(r), fmt(m), fmt(t), pct(change), verdict])
    if not rows:
        return [
            *lines,
            "Not answered by this run: it needs the *selflm* arm and *real_only* (or "
            "*real_only_matched*) run to the same round.",
            "",
        ]
    lines += [
        "*selflm* trains on generated samples plus real replay text; the *real_only* arms "
        "train on real replay text alone (same rounds, gate and meta-step), with as many "
        "real tokens as *selflm* used (prompts inside samples counted as real) or as many "
        "tokens in all. Generated data helped only if *selflm* ends lower on the test split. "
        f"*{DEFAULT_ARM}* (the round defaults now) differs from *selflm* only in which "
        "generated samples it selects, so the same real-text arms are its baselines.",
        "",
    ]
    lines += table(
        ["arm", "against", "round", "its test ppl", "theirs", "change", "helped?"],
        rows,
    )
    return [*lines, ""]


def render(
    data: dict[str, Any],
    plot_name: str | None,
    notes: str | None,
    noise: dict[str, Any] | None = None,
) -> str:
    meta = data.get("meta", {})
    arms = arms_in_order(data)
    summaries = summaries_of(data, noise)
    lines = [
        "# Self-update quality study",
        "",
        "Do self-update rounds make the model *better* on held-out real text, or only "
        "different? (issues 6 and 15). Generated by `python -m studies.quality.report` from "
        f"`results.json` ({datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; results last "
        f"updated {meta.get('updated_at', '?')}). Rerun the study with "
        "`python -m studies.quality` (see its `--help`).",
        "",
    ]
    lines += setup_section(data)

    lines += ["## Targets", ""]
    lines += [
        f"The issue's targets for the round defaults (*{DEFAULT_ARM}*; *selflm* ran the "
        f"defaults before session 10) after {meta.get('rounds')} rounds, against "
        'the base model (round 0). "Within 5%" is read as relative and two-sided.',
        "",
    ]
    target_arm = next((a for a in (DEFAULT_ARM, "selflm") if a in summaries), None)
    target_arm = target_arm or (arms[0] if arms else None)
    if target_arm and target_arm in summaries:
        s = summaries[target_arm]
        if target_arm != DEFAULT_ARM:
            lines += [f"(*{DEFAULT_ARM}* not in this run; shown for *{target_arm}*.)", ""]
        lines += [f"*{target_arm}* after round {s.rounds}:", ""]
        lines += table(
            ["target", "value", "status", "gap"],
            [[t, v, _mark(m), g] for t, v, m, g in s.checks],
        )
        lines += [""]

    lines += ["### All arms after their last round", ""]
    rows = []
    for a in arms:
        if a not in summaries:
            continue
        s = summaries[a]
        checks = s.checks
        met = sum(1 for *_, ok, _g in checks if ok)
        rows.append(
            [
                a,
                str(s.rounds),
                f"{s.promotions}" + (f" ({s.failed} failed)" if s.failed else ""),
                f"{fmt(s.final.get('test_ppl'))} ({pct(s.test_change)})",
                f"{fmt(s.final.get('unrelated_ppl'))} ({pct(s.unrelated_change)})",
                f"{fmt(s.final.get('distinct_2'))} ({pct(s.distinct2_change)})",
                f"{fmt(s.final.get('repetition_rate'))} ({pct(s.repetition_change)})",
                str(len(s.worse_than_parent)),
                f"{met}/{len(checks)}",
            ]
        )
    lines += table(
        [
            "arm",
            "rounds",
            "promotions",
            "test ppl (vs base)",
            "unrelated ppl (vs base)",
            "distinct-2 (vs base)",
            "repetition (vs base)",
            "promoted but worse on test",
            "targets met",
        ],
        rows,
    )
    lines += [""]

    lines += _generated_vs_real(data)
    lines += ["## Test-split perplexity and distinct-2 per round", ""]
    if plot_name:
        lines += [
            f"![test-split perplexity and distinct-2 per round and arm]({plot_name})",
            "",
            "Outlined dots: rounds that promoted. Dashed: the base; dotted: the targets "
            "(test ppl 5% below the base; distinct-2 within ±5%).",
            "",
        ]
    else:
        lines += ["(no plot: matplotlib is not installed)", ""]

    lines += [
        "## Per arm and round",
        "",
        "*dev ppl* is the round's own gate set (dev split for the dev gate; the round's "
        "generated valid split for the reference arm's gate), champion → candidate after the "
        "meta-step. *Δ* columns are relative to the base (round 0). A failed round keeps its "
        "champion.",
        "",
    ]
    for a in arms:
        recs = sorted((r for r in data["records"] if r["arm"] == a), key=lambda r: r["round"])
        base = next((r for r in recs if r["round"] == 0), None)
        gate_generated = meta.get("arms", {}).get(a, {}).get("params", {}).get("gate") == (
            "generated"
        )
        lines += [f"### {a}", ""]
        rows = []
        for r in recs:
            if r["round"] == 0:
                decision = "base"
                gate = "–"
            else:
                decision = r.get("decision") or r.get("status") or "?"
                if gate_generated:
                    c, d = r.get("champion_valid_ppl"), r.get("candidate_valid_ppl")
                else:
                    c, d = r.get("champion_dev_ppl"), r.get("candidate_dev_ppl")
                gate = f"{fmt(c)} → {fmt(d)}"
            rows.append(
                [
                    str(r["round"]),
                    f"v{r.get('champion_version')}",
                    f"**{decision}**" if decision == "promoted" else decision,
                    fmt(r.get("epsilon"), 2),
                    gate,
                    fmt(r.get("test_ppl")),
                    pct(rel(r.get("test_ppl"), base and base.get("test_ppl"))),
                    fmt(r.get("unrelated_ppl")),
                    pct(rel(r.get("unrelated_ppl"), base and base.get("unrelated_ppl"))),
                    fmt(r.get("distinct_1")),
                    fmt(r.get("distinct_2")),
                    fmt(r.get("repetition_rate")),
                    fmt(r.get("round_seconds"), 0),
                ]
            )
        lines += table(
            [
                "round",
                "champion",
                "decision",
                "ε",
                "gate ppl",
                "test ppl",
                "Δ test",
                "unrelated ppl",
                "Δ unrel.",
                "distinct-1",
                "distinct-2",
                "repetition",
                "round s",
            ],
            rows,
        )
        errors = [r for r in recs if r.get("error")]
        for r in errors:
            lines += ["", f"- round {r['round']} error: `{r['error']}`"]
        lines += [""]

    lines += [
        "## What the numbers say",
        "",
        NOTES_BEGIN,
        notes if notes is not None else NOTES_PLACEHOLDER,
        NOTES_END,
        "",
    ]
    return "\n".join(lines)


def write_report(results: Path, report: Path) -> tuple[Path, Path | None]:
    """Write the report (and the plot beside it); returns their paths (plot None if skipped)."""
    data = json.loads(results.read_text(encoding="utf-8"))
    plot = plot_path_for(report)
    has_plot = write_plot(data, plot)
    rel_plot = None
    if has_plot:
        rel_plot = plot.name if plot.parent.resolve() == report.parent.resolve() else str(plot)
    noise_path = results.with_name("probe_noise.json")
    noise = json.loads(noise_path.read_text()) if noise_path.exists() else None
    text = render(data, rel_plot, _existing_notes(report), noise)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text, encoding="utf-8")
    log.info("wrote %s%s", report, f" and {plot}" if has_plot else "")
    return report, plot if has_plot else None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.quality.report", description=__doc__)
    p.add_argument("--results", type=Path, default=Path("docs/quality/results.json"))
    p.add_argument("--report", type=Path, default=Path("docs/quality.md"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    write_report(args.results, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
