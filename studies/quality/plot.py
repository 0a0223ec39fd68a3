"""The report's plot: the champion's test-split perplexity and distinct-2 per round, every arm."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from studies.quality.summary import DIVERSITY_BAND, TEST_GAIN, arms_in_order, num

log = logging.getLogger("studies.quality.report")

# (record field, axis label, the target band around the base: (low factor, high factor))
PANELS = (
    ("test_ppl", "test-split perplexity (lower is better)", (1 - TEST_GAIN, None)),
    ("distinct_2", "distinct-2 of samples (probe)", (1 - DIVERSITY_BAND, 1 + DIVERSITY_BAND)),
)


def plot_path_for(report: Path) -> Path:
    return report.with_name(f"{report.stem}_rounds.png")


def _panel(ax: Any, data: dict[str, Any], field: str, label: str, band: Any) -> None:
    markers = "os^Dvpx*<>h"
    base: float | None = None
    for n, arm in enumerate(arms_in_order(data)):
        recs = sorted((r for r in data["records"] if r["arm"] == arm), key=lambda r: r["round"])
        pts = [(r["round"], num(r.get(field))) for r in recs]
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
        promoted = [(r["round"], num(r.get(field))) for r in recs if r.get("promoted")]
        px = [x for x, y in promoted if y is not None and math.isfinite(y)]
        py = [y for _, y in promoted if y is not None and math.isfinite(y)]
        ax.scatter(px, py, s=40, color=line.get_color(), edgecolors="black", zorder=3)
        if base is None and recs and recs[0]["round"] == 0:
            base = num(recs[0].get(field))
    if base is not None and math.isfinite(base):
        ax.axhline(base, color="gray", linestyle="--", linewidth=1, label="base")
        for factor in band:
            if factor is not None:
                ax.axhline(base * factor, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("round (0 = base; ● outlined = promoted that round)")
    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo > 4:  # one arm far off (a collapsing loop) would flatten the rest
        ax.set_yscale("log")
        label += ", log scale"
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)


def write_plot(data: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install -e '.[dev]')")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, (field, label, band) in zip(axes, PANELS, strict=True):
        _panel(ax, data, field, label, band)
    axes[0].legend(fontsize=7)
    meta = data.get("meta", {})
    name = meta.get("eval_sets", {}).get("domain_name") or meta.get("domain") or "pydoc"
    fig.suptitle(
        f"Champion per round — {meta.get('base_model', '?')}, domain {name} "
        "(dotted: the targets, base −5% test ppl and ±5% distinct-2)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
