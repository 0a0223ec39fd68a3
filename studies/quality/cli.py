"""The quality study's command line (``python -m studies.quality --help``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from studies.quality import domains
from studies.quality.arms import ARMS, DEFAULT_ARMS
from studies.quality.measure import DEFAULT_UNRELATED


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m studies.quality",
        description="Self-update quality study: N rounds per arm from the same base.",
    )
    p.add_argument("--rounds", type=int, default=8, help="rounds per arm (default 8)")
    p.add_argument(
        "--arms",
        default=",".join(DEFAULT_ARMS),
        help=f"comma-separated arms, or 'all' (known: {', '.join(ARMS)})",
    )
    p.add_argument("--base-model", default="bundled:smollm2-135m-instruct")
    p.add_argument(
        "--domain",
        default=None,
        help=f"domain corpus: {' or '.join(domains.DOMAINS)} (bundled; default pydoc) or a "
        "path (directory of text files, .jsonl or text file)",
    )
    p.add_argument(
        "--unrelated",
        default=DEFAULT_UNRELATED,
        help=f"unrelated real corpus: directory, .jsonl or text file (default {DEFAULT_UNRELATED})",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory (default docs/quality/, docs/quality/<domain>/ for others)",
    )
    p.add_argument("--work", type=Path, default=Path("data/quality"), help="stores per arm")
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        help="report path (default docs/quality.md, docs/quality_<domain>.md for others)",
    )
    p.add_argument(
        "--traffic",
        type=Path,
        default=None,
        help="question stream for served arms, one per line (default: the domain's bundled "
        "studies/quality/streams/<corpus name>.txt)",
    )
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--seed", type=int, default=0, help="round i uses seed SEED + i (every arm)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--small", action="store_true", help="tiny rounds and measurements (smoke)")
    p.add_argument("--resume", action="store_true", help="skip (arm, round) pairs already done")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="[ARM:]KEY=VALUE",
        help="round-parameter override for every arm (the arm's own win) or for one arm",
    )
    p.add_argument("--test-passages", type=int, default=None, help="0 = whole test split")
    p.add_argument("--unrelated-passages", type=int, default=None, help="0 = whole corpus")
    p.add_argument("--diversity-prompts", type=int, default=None)
    p.add_argument("-v", "--verbose", action="store_true")
    return p
