"""Write ``docs/quality.md`` (and its test-perplexity plot) from the study's ``results.json``.

    .venv/bin/python -m bench.quality_report [--results docs/quality/results.json]
                                             [--report docs/quality.md]

The plot goes beside the report as ``<report stem>_test_ppl.png``. The section "What the
numbers say" is written by hand: its text between the two HTML markers survives every
regeneration of the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.quality_report")

NOTES_BEGIN = "<!-- BEGIN what-the-numbers-say (hand-written; kept when the report is rebuilt) -->"
NOTES_END = "<!-- END what-the-numbers-say -->"
NOTES_PLACEHOLDER = (
    "_Placeholder — the lead fills this in after the full run: which arms improved the test "
    "split and by how much, where the design does not help (which component made no "
    "difference or hurt), how the reference loop compares, and which round defaults changed "
    "because of it._"
)

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


def plot_path_for(report: Path) -> Path:
    return report.with_name(f"{report.stem}_test_ppl.png")


# --------------------------------------------------------------------------- numbers


def _num(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return float(value)  # "inf" as written by the study for an overflowed ppl
        except ValueError:
            return None
    return float(value)


def _rel(value: Any, base: Any) -> float | None:
    v, b = _num(value), _num(base)
    if v is not None and v == b == 0:
        return 0.0
    if v is None or b is None or b == 0 or not math.isfinite(v) or not math.isfinite(b):
        return None
    return v / b - 1.0


def fmt(value: Any, digits: int = 3) -> str:
    v = _num(value)
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
        change = _rel(by_round[i].get("test_ppl"), by_round[i - 1].get("test_ppl"))
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
        test_change=_rel(final.get("test_ppl"), base.get("test_ppl")),
        unrelated_change=_rel(final.get("unrelated_ppl"), base.get("unrelated_ppl")),
        distinct2_change=_rel(final.get("distinct_2"), base.get("distinct_2")),
        repetition_change=_rel(final.get("repetition_rate"), base.get("repetition_rate")),
        worse_than_parent=worse,
    )


def _arms_in_order(data: dict[str, Any]) -> list[str]:
    order = list(data.get("meta", {}).get("arm_order", []))
    for r in data.get("records", []):
        if r["arm"] not in order:
            order.append(r["arm"])
    return [a for a in order if any(r["arm"] == a for r in data.get("records", []))]


# --------------------------------------------------------------------------- plot


def write_plot(data: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install -e '.[dev]')")
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    base_ppl: float | None = None
    markers = "os^Dvpx*"
    for n, arm in enumerate(_arms_in_order(data)):
        recs = sorted((r for r in data["records"] if r["arm"] == arm), key=lambda r: r["round"])
        pts = [(r["round"], _num(r.get("test_ppl"))) for r in recs]
        xs = [x for x, y in pts if y is not None and math.isfinite(y)]
        ys = [y for _, y in pts if y is not None and math.isfinite(y)]
        if not xs:
            continue
        # Distinct markers and some transparency: arms that promote the same weights overlap.
        (line,) = ax.plot(
            xs,
            ys,
            marker=markers[n % len(markers)],
            markersize=4,
            linewidth=1.5,
            alpha=0.85,
            label=arm,
        )
        promoted = [(r["round"], _num(r.get("test_ppl"))) for r in recs if r.get("promoted")]
        px = [x for x, y in promoted if y is not None and math.isfinite(y)]
        py = [y for _, y in promoted if y is not None and math.isfinite(y)]
        ax.scatter(px, py, s=40, color=line.get_color(), edgecolors="black", zorder=3)
        if base_ppl is None and recs and recs[0]["round"] == 0:
            base_ppl = _num(recs[0].get("test_ppl"))
    if base_ppl is not None and math.isfinite(base_ppl):
        ax.axhline(base_ppl, color="gray", linestyle="--", linewidth=1, label="base")
        ax.axhline(
            base_ppl * (1 - TEST_GAIN),
            color="gray",
            linestyle=":",
            linewidth=1,
            label="target (base − 5%)",
        )
    meta = data.get("meta", {})
    ax.set_title(f"Test-split perplexity of the champion — {meta.get('base_model', '?')}")
    ax.set_xlabel("round (0 = base; ● outlined = promoted that round)")
    ax.set_ylabel("test-split perplexity (lower is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- markdown


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


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


def _setup_section(data: dict[str, Any]) -> list[str]:
    meta = data.get("meta", {})
    sets = meta.get("eval_sets", {})
    measure = meta.get("measure", {})
    docs = sets.get("domain_docs", {})
    env = meta.get("environment", {})
    lines = ["## Setup", ""]
    if meta.get("small"):
        lines += [
            "> **Smoke run (`--small`)**: rounds and measurements are shrunk to seconds; these "
            "numbers say nothing about quality.",
            "",
        ]
    lines += [
        f"- **Base model**: `{meta.get('base_model')}`, imported once as v1 and copied into a "
        "fresh store (SQLite database + checkpoint directory) per arm.",
        f"- **Rounds**: {meta.get('rounds')} consecutive rounds per arm through the real "
        "pipeline (`records.create_round` + `run_round`); round *i* uses seed "
        f"{meta.get('seed')} + *i* in every arm, so all arms draw the same prompts.",
        f"- **Domain corpus**: `{meta.get('domain') or 'pydoc topics (CPython pydoc_data)'}`, "
        f"split by document with seed {sets.get('split_seed')} (the pipeline's) into "
        f"train {docs.get('train')} / dev {docs.get('dev')} / test {docs.get('test')} "
        "documents. Rounds draw prompts and replay text from *train* and gate on *dev*; the "
        f"study measures the **test** split only: {sets.get('test_passages')} of its "
        f"{sets.get('test_passages_total')} passages (≤160 words each).",
        f"- **Unrelated corpus**: `{meta.get('unrelated')}` ({sets.get('unrelated_docs')} "
        f"documents; {sets.get('unrelated_passages')} of {sets.get('unrelated_passages_total')} "
        "passages, a seeded sample spread over all documents). The default is the license "
        "texts Debian ships in `/usr/share/common-licenses` (GPL, LGPL, GFDL, Apache, MPL, "
        "Artistic, BSD, CC0): real English prose, legal rather than technical, present offline "
        "on this machine and in the `python:3.11-slim` image the Dockerfile builds on. No "
        "round ever sees it; it measures general ability outside the domain. Configurable "
        "with `--unrelated`.",
        f"- **Diversity**: {sets.get('diversity_prompts')} fixed prompts from the domain train "
        f"split (seed {sets.get('prompt_seed')}), one sample each, "
        f"{measure.get('max_new_tokens')} new tokens, temperature {measure.get('temperature')}, "
        f"top-p {measure.get('top_p')}, fixed seed; distinct-1/2 (corpus-level) and mean "
        "trigram repetition rate.",
        "- **Measured model**: after every round, the lineage's *champion* — the candidate if "
        "the round promoted it, else the unchanged previous champion. Round 0 is the base.",
        f"- **Machine**: {env.get('machine')}, {env.get('cpus')} CPUs, torch "
        f"{env.get('torch')}, CUDA {'yes' if env.get('cuda') else 'no'}.",
        "",
        "### Arms",
        "",
    ]
    rows = []
    for arm in _arms_in_order(data):
        info = meta.get("arms", {}).get(arm, {})
        ov = info.get("overrides", {})
        ov_text = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in ov.items()) or "(none)"
        rows.append([arm, ARM_NOTES.get(arm, ""), ov_text])
    lines += _table(["arm", "what", "overrides of the round defaults"], rows)
    common = meta.get("common_overrides") or {}
    lines += [""]
    if common:
        lines += [
            "Overrides for every arm (an arm's own win): "
            + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in common.items()),
            "",
        ]
    lines += [
        "The *reference* arm is the reference article's loop: random selection, no filters, no "
        "replay, no meta-step, promotion whenever perplexity on the round's own generated "
        "valid split does not get worse (margin 0), and the article's learning rate (1e-4) and "
        "epochs (5). The article trains one sample at a time (batch size 1); here it runs on "
        "our batched trainer (same AdamW family, padded batches with attention masks) to "
        "keep the study's wall time bounded. The exact parameters of every arm are in "
        "`results.json` (`meta.arms`).",
        "",
    ]
    return lines


def render(data: dict[str, Any], plot_name: str | None, notes: str | None) -> str:
    meta = data.get("meta", {})
    arms = _arms_in_order(data)
    summaries = {
        a: s
        for a in arms
        if (s := summarize(a, [r for r in data["records"] if r["arm"] == a])) is not None
    }
    lines = [
        "# Self-update quality study",
        "",
        "Do self-update rounds make the model *better* on held-out real text, or only "
        "different? (issue 6). Generated by `python -m bench.quality_report` from "
        f"`results.json` ({datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; results last "
        f"updated {meta.get('updated_at', '?')}). Rerun the study with "
        "`python -m bench.quality` (see its `--help`).",
        "",
    ]
    lines += _setup_section(data)

    lines += ["## Targets", ""]
    lines += [
        f"The issue's targets for the *selflm* arm after {meta.get('rounds')} rounds, against "
        'the base model (round 0). "Within 5%" is read as relative and two-sided.',
        "",
    ]
    target_arm = "selflm" if "selflm" in summaries else (arms[0] if arms else None)
    if target_arm and target_arm in summaries:
        s = summaries[target_arm]
        if target_arm != "selflm":
            lines += [f"(*selflm* not in this run; shown for *{target_arm}*.)", ""]
        lines += [f"*{target_arm}* after round {s.rounds}:", ""]
        lines += _table(
            ["target", "value", "status", "gap"],
            [[t, v, _mark(m), g] for t, v, m, g in s.checks],
        )
        lines += [""]

    lines += ["### All arms after their last round", ""]
    rows = []
    for a in arms:
        s = summaries.get(a)
        if s is None:
            continue
        met = sum(1 for *_, ok, _g in s.checks if ok)
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
                f"{met}/5",
            ]
        )
    lines += _table(
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

    lines += ["## Test-split perplexity per round", ""]
    if plot_name:
        lines += [
            f"![test-split perplexity per round and arm]({plot_name})",
            "",
            "Outlined dots: rounds that promoted. Dashed: the base; dotted: the 5% target.",
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
                    pct(_rel(r.get("test_ppl"), base and base.get("test_ppl"))),
                    fmt(r.get("unrelated_ppl")),
                    pct(_rel(r.get("unrelated_ppl"), base and base.get("unrelated_ppl"))),
                    fmt(r.get("distinct_1")),
                    fmt(r.get("distinct_2")),
                    fmt(r.get("repetition_rate")),
                    fmt(r.get("round_seconds"), 0),
                ]
            )
        lines += _table(
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
    text = render(data, rel_plot, _existing_notes(report))
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text, encoding="utf-8")
    log.info("wrote %s%s", report, f" and {plot}" if has_plot else "")
    return report, plot if has_plot else None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality_report", description=__doc__)
    p.add_argument("--results", type=Path, default=Path("docs/quality/results.json"))
    p.add_argument("--report", type=Path, default=Path("docs/quality.md"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    write_report(args.results, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
