"""The report's plot: the champion's test-split perplexity per round and arm."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from studies.quality.summary import TEST_GAIN, arms_in_order, num

log = logging.getLogger("studies.quality.report")


def plot_path_for(report: Path) -> Path:
    return report.with_name(f"{report.stem}_test_ppl.png")


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
    for n, arm in enumerate(arms_in_order(data)):
        recs = sorted((r for r in data["records"] if r["arm"] == arm), key=lambda r: r["round"])
        pts = [(r["round"], num(r.get("test_ppl"))) for r in recs]
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
        promoted = [(r["round"], num(r.get("test_ppl"))) for r in recs if r.get("promoted")]
        px = [x for x, y in promoted if y is not None and math.isfinite(y)]
        py = [y for _, y in promoted if y is not None and math.isfinite(y)]
        ax.scatter(px, py, s=40, color=line.get_color(), edgecolors="black", zorder=3)
        if base_ppl is None and recs and recs[0]["round"] == 0:
            base_ppl = num(recs[0].get("test_ppl"))
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
