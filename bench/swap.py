"""Hot-swap benchmark: the largest serving gap while a replica swaps models under load.

Starts one real replica (``selflm serve``, fresh SQLite database, polling every 0.5 s),
records a second version (v1's weights perturbed slightly) as a candidate, runs C client
threads of /generate, promotes v2 with ``POST /checkpoints/2/promote`` and keeps the load
on until after the swap. Reports requests sent and failed, the largest gap between
consecutive completed responses around the swap (and, as the baseline, before it),
promotion → first v2 response, promotion → swapped, and the replica's load time. The
headline is the swap gap in steady batch intervals (target ≤ 1): the largest gap in the
swap window (promotion → first v2 response) over the median of the largest gaps in steady
windows of the same length before the promotion. The largest gap of a window grows with
its length, so the whole steady window's largest gap (also reported) is a longer window's.

    .venv/bin/python -m bench.swap --checkpoint-dir data/bench-ck
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from bench.load import SwapRun, run_swaps, swap_summary
from bench.report import default_out, md_table, ratio, run_info, setup_logging, write_json
from bench.server import parse_env, server_info, start_server, stop_server, warm_up
from bench.state import DEFAULT_MODEL, add_candidate, bench_prompts, prepare_state, workdir_for

log = logging.getLogger("bench.swap")

TARGET_GAP_INTERVALS = 1.0  # the swap may cost at most one steady batch interval


def add_swap_args(ap: argparse.ArgumentParser, name: str) -> None:
    """Arguments shared by bench.swap and bench.memory."""
    ap.add_argument("--model", default=DEFAULT_MODEL, help="base model (SELFLM_BASE_MODEL form)")
    ap.add_argument(
        "--checkpoint-dir",
        help="checkpoint store to reuse (the base model is imported there on first use)",
    )
    ap.add_argument("--workdir", help="keep database, candidate and server log here")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=32, help="size of the fixed prompt list")
    ap.add_argument(
        "--pre-s",
        type=float,
        default=20.0,
        help="load before the promotion (room for a few steady windows as long as the swap's)",
    )
    ap.add_argument("--post-s", type=float, default=2.0, help="load after the swap")
    ap.add_argument("--noise", type=float, default=1e-3, help="relative perturbation of v2")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up requests before measuring")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra server environment, e.g. SELFLM_DTYPE=bfloat16 (repeatable)",
    )
    ap.add_argument("--out", default=default_out(name))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench.swap", description=__doc__.split("\n\n")[0])
    add_swap_args(ap, "swap")
    ap.add_argument(
        "--swaps",
        type=int,
        default=1,
        help="swaps in one run, alternating v2 and v1 under the same load, each after "
        "--pre-s of steady serving; with more than one the headline is the median over swaps",
    )
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_logging()
    prompts = bench_prompts(args.prompts, args.seed)
    extra_env = parse_env(args.server_env)
    results: dict[str, Any] = {
        "bench": "swap",
        "model": args.model,
        "clients": args.clients,
        "max_new_tokens": args.max_new_tokens,
        "run": run_info(argv),
        "server_env": extra_env,
    }
    with workdir_for(args.workdir, "selflm-bench-swap-") as workdir:
        state = prepare_state(args.model, args.checkpoint_dir, workdir)
        results["checkpoint"] = str(state.base_path)
        results["candidate"] = str(add_candidate(state, 2, args.noise, args.seed))
        server = start_server(state, extra_env)
        try:
            results["server"] = {"startup_s": server.started_s, **server_info(server)}
            warm_up(server, prompts, args.warmup)
            versions = [2 if i % 2 == 0 else 1 for i in range(max(1, args.swaps))]
            runs = run_swaps(
                server,
                prompts,
                versions,
                args.clients,
                args.max_new_tokens,
                args.pre_s,
                args.post_s,
            )
        finally:
            stop_server(server)
            state.db.dispose()
    summaries = [summarize(run) for run in runs]
    results.update(summaries[0])
    srv = results["server"]
    if len(summaries) > 1:
        results["swaps"] = summaries
        results["series"] = series_summary(summaries)
        print_series(args, srv, summaries, results["series"])
        write_json(args.out, results)
        return results

    s = summaries[0]
    rows = [
        ["requests sent", s["requests"], ""],
        ["failed", s["failed"], "0"],
        ["largest gap around the swap (ms)", s["largest_gap_ms"], ""],
        ["… ended, after the promotion (ms)", s["largest_gap_ended_after_promotion_ms"], ""],
        ["swap window: promotion → first v2 response (s)", s["window_s"], ""],
        [
            "steady batch interval: median largest gap, steady windows as long (ms)",
            s["steady_equal_window_gap_ms"] or "-",
            "baseline",
        ],
        [
            "… those windows' largest gaps (ms)",
            " / ".join(f"{g:.0f}" for g in s["steady_equal_window_gaps_ms"]) or "-",
            "",
        ],
        [
            "swap gap in steady batch intervals",
            s["gap_vs_steady"] if s["gap_vs_steady"] is not None else "-",
            f"≤ {TARGET_GAP_INTERVALS:g}",
        ],
        [
            f"largest gap in the whole steady window, {s['steady_window_s']:.0f} s (ms)",
            s["steady_largest_gap_ms"],
            "",
        ],
        ["swap gap over that", s["gap_vs_whole_steady_window"], ""],
        ["promotion → first v2 response (ms)", s["promote_to_first_v2_response_ms"] or "-", ""],
        ["promotion → serving v2 (ms)", s["promote_to_swapped_ms"], ""],
        ["replica load time (s)", s["load_seconds"] if s["load_seconds"] is not None else "-", ""],
    ]
    print(
        f"\n### Hot swap under load ({args.model}, {srv.get('model_dtype')}, "
        f"{args.clients} clients, max_new_tokens {args.max_new_tokens})\n"
    )
    print(md_table(["metric", "value", "target"], rows))
    write_json(args.out, results)
    return results


def summarize(run: SwapRun) -> dict[str, Any]:
    """`swap_summary` plus the swap gap in steady intervals (equal windows, whole window)."""
    summary = swap_summary(run)
    # None (shown "-") when the swap window was longer than the steady load: no equal window.
    steady = summary["steady_equal_window_gap_ms"]
    summary["gap_vs_steady"] = ratio(summary["largest_gap_ms"], steady) if steady else None
    summary["gap_vs_whole_steady_window"] = ratio(
        summary["largest_gap_ms"], summary["steady_largest_gap_ms"]
    )
    log.info("swap to v%d: %s", run.version, summary)
    return summary


def series_summary(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Over a series of swaps: the median swap gap against the median steady window gap
    (every steady window of every segment, each as long as its own swap's window)."""
    gaps = [s["largest_gap_ms"] for s in summaries]
    steady = [g for s in summaries for g in s["steady_equal_window_gaps_ms"]]
    ratios = [s["gap_vs_steady"] for s in summaries if s["gap_vs_steady"] is not None]
    med_steady = statistics.median(steady) if steady else None
    return {
        "swaps": len(summaries),
        "requests": sum(s["requests"] for s in summaries),
        "failed": sum(s["failed"] for s in summaries),
        "median_swap_gap_ms": statistics.median(gaps),
        "max_swap_gap_ms": max(gaps),
        "median_steady_window_gap_ms": med_steady,
        "steady_windows": len(steady),
        "gap_vs_steady": ratio(statistics.median(gaps), med_steady) if med_steady else None,
        "median_per_swap_ratio": statistics.median(ratios) if ratios else None,
        "swaps_within_target": sum(1 for r in ratios if r <= TARGET_GAP_INTERVALS),
        "median_load_seconds": statistics.median(
            [s["load_seconds"] for s in summaries if s["load_seconds"] is not None] or [0.0]
        ),
    }


def print_series(
    args: argparse.Namespace,
    srv: dict[str, Any],
    summaries: Sequence[dict[str, Any]],
    series: dict[str, Any],
) -> None:
    def fmt(x: float | None, spec: str = ".0f") -> str:
        return "-" if x is None else format(x, spec)

    rows = [
        [
            i + 1,
            f"v{s['version']}",
            s["requests"],
            s["failed"],
            fmt(s["largest_gap_ms"]),
            fmt(s["largest_gap_ended_after_promotion_ms"]),
            fmt(s["window_s"], ".1f"),
            fmt(s["steady_equal_window_gap_ms"]),
            fmt(s["gap_vs_steady"], ".2f"),
            fmt(s["load_seconds"], ".2f"),
        ]
        for i, s in enumerate(summaries)
    ]
    print(
        f"\n### Hot swaps under load ({args.model}, {srv.get('model_dtype')}, "
        f"{args.clients} clients, max_new_tokens {args.max_new_tokens}, {len(summaries)} swaps)\n"
    )
    head = [
        "swap",
        "to",
        "requests",
        "failed",
        "swap gap ms",
        "ended after promotion ms",
        "window s",
        "steady gap ms (median)",
        "× steady",
        "load s",
    ]
    print(md_table(head, rows))
    t = series
    print()
    print(
        md_table(
            ["over the series", "value", "target"],
            [
                ["requests sent / failed", f"{t['requests']} / {t['failed']}", "0 failed"],
                [
                    "median / largest swap gap (ms)",
                    f"{t['median_swap_gap_ms']:.0f} / {t['max_swap_gap_ms']:.0f}",
                    "",
                ],
                [
                    f"median steady window gap, {t['steady_windows']} windows (ms)",
                    fmt(t["median_steady_window_gap_ms"]),
                    "baseline",
                ],
                [
                    "**median swap gap in steady intervals**",
                    fmt(t["gap_vs_steady"], ".2f"),
                    f"≤ {TARGET_GAP_INTERVALS:g}",
                ],
                ["median of the per-swap ratios", fmt(t["median_per_swap_ratio"], ".2f"), ""],
                ["swaps within the target", f"{t['swaps_within_target']} / {t['swaps']}", ""],
                ["median replica load time (s)", f"{t['median_load_seconds']:.2f}", ""],
            ],
        )
    )


if __name__ == "__main__":
    main()
    sys.exit(0)
