"""Memory benchmark: peak RSS of the API process, steady and during a hot swap.

Starts one real replica as bench.swap does and samples the API process's VmRSS from
``/proc/<pid>/status`` every 50 ms. Steady: C clients of /generate for ``--steady-s`` after
warm-up requests. Swap: the same load while v2 is promoted and loaded (see bench.swap).
Before each phase the kernel's peak counter (VmHWM) is reset through ``clear_refs`` where
allowed, so a spike between two samples is still caught. Peaks are reported against the
weights' size (the ``*.safetensors`` files of the base checkpoint).

    .venv/bin/python -m bench.memory --checkpoint-dir data/bench-ck
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.load import Load, run_swap, swap_summary
from bench.report import md_table, ratio, run_info, setup_logging, write_json
from bench.rss import RssSampler, proc_status, reset_peak
from bench.server import parse_env, server_info, start_server, stop_server, warm_up
from bench.state import add_candidate, bench_prompts, prepare_state, workdir_for
from bench.swap import add_swap_args
from core.store import weights_bytes

log = logging.getLogger("bench.memory")

TARGET_STEADY = 1.5
TARGET_SWAP = 2.5
MIB = 1024 * 1024


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench.memory", description=__doc__.split("\n\n")[0])
    add_swap_args(ap, "memory")
    ap.add_argument("--steady-s", type=float, default=5.0, help="steady load duration")
    ap.add_argument("--interval", type=float, default=0.05, help="RSS sampling interval (s)")
    ap.add_argument(
        "--worker-round",
        action="store_true",
        help="measure the worker instead: one round's peak RSS per stage (bench.round_memory)",
    )
    return ap.parse_args(argv)


def _phase(
    sampler: RssSampler, pid: int, start: float, end: float, hwm_reset: bool
) -> dict[str, Any]:
    sampled = sampler.peak(start, end)
    hwm = proc_status(pid).get("VmHWM", 0) if hwm_reset else 0
    return {
        "peak_rss_bytes": max(sampled, hwm),
        "sampled_peak_rss_bytes": sampled,
        "hwm_bytes": hwm if hwm_reset else None,
        "samples": sampler.count(start, end),
        "seconds": end - start,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    rest = list(sys.argv[1:] if argv is None else argv)
    if "--worker-round" in rest:  # the worker's memory: bench/round_memory.py
        from bench import round_memory

        rest.remove("--worker-round")
        return round_memory.main(rest)
    args = parse_args(argv)
    setup_logging()
    prompts = bench_prompts(args.prompts, args.seed)
    extra_env = parse_env(args.server_env)
    results: dict[str, Any] = {
        "bench": "memory",
        "model": args.model,
        "clients": args.clients,
        "max_new_tokens": args.max_new_tokens,
        "run": run_info(argv),
        "server_env": extra_env,
    }
    with workdir_for(args.workdir, "selflm-bench-memory-") as workdir:
        state = prepare_state(args.model, args.checkpoint_dir, workdir)
        weights = weights_bytes(state.base_path)
        results["checkpoint"] = str(state.base_path)
        results["weights_bytes"] = weights
        results["candidate"] = str(add_candidate(state, 2, args.noise, args.seed))
        server = start_server(state, extra_env)
        pid = server.pid
        try:
            results["server"] = {"startup_s": server.started_s, **server_info(server)}
            results["idle_rss_bytes"] = proc_status(pid)["VmRSS"]
            results["startup_hwm_bytes"] = proc_status(pid)["VmHWM"]
            with RssSampler(pid, args.interval) as sampler:
                warm_up(server, prompts, args.warmup)
                hwm_reset = reset_peak(pid)
                t0 = time.monotonic()
                with Load(server.url, prompts, args.clients, args.max_new_tokens) as load:
                    time.sleep(args.steady_s)
                t1 = time.monotonic()
                steady = _phase(sampler, pid, t0, t1, hwm_reset)
                steady["requests"] = len(load.results)
                steady["failed"] = sum(1 for o in load.results if o.status != 200)
                hwm_reset = reset_peak(pid)
                run = run_swap(
                    server,
                    prompts,
                    2,
                    args.clients,
                    args.max_new_tokens,
                    args.pre_s,
                    args.post_s,
                )
                swap = _phase(sampler, pid, run.load_started, run.stopped, hwm_reset)
                after = proc_status(pid)
                swap["after_rss_bytes"] = after["VmRSS"]
                swap["after_rss_anon_bytes"] = after.get("RssAnon")
                swap["after_rss_file_bytes"] = after.get("RssFile")
        finally:
            stop_server(server)
            state.db.dispose()
    summary = swap_summary(run)
    swap.update(
        requests=summary["requests"],
        failed=summary["failed"],
        largest_gap_ms=summary["largest_gap_ms"],
        load_seconds=summary["load_seconds"],
    )
    steady["ratio_to_weights"] = ratio(steady["peak_rss_bytes"], weights)
    swap["ratio_to_weights"] = ratio(swap["peak_rss_bytes"], weights)
    results["steady"] = steady
    results["swap"] = swap
    results["idle_ratio_to_weights"] = ratio(results["idle_rss_bytes"], weights)
    log.info("steady %s; swap %s", steady, swap)

    rows = [
        ["weights (*.safetensors)", weights / MIB, 1.0, ""],
        [
            "API idle after start",
            results["idle_rss_bytes"] / MIB,
            results["idle_ratio_to_weights"],
            "",
        ],
        [
            "API peak, steady load",
            steady["peak_rss_bytes"] / MIB,
            steady["ratio_to_weights"],
            f"≤ {TARGET_STEADY}×",
        ],
        [
            "API peak, during swap",
            swap["peak_rss_bytes"] / MIB,
            swap["ratio_to_weights"],
            f"≤ {TARGET_SWAP}×",
        ],
        [
            "API after swap",
            swap["after_rss_bytes"] / MIB,
            ratio(swap["after_rss_bytes"], weights),
            "",
        ],
    ]
    srv = results["server"]
    print(
        f"\n### API memory ({args.model}, {srv.get('model_dtype')}, {args.clients} clients; "
        f"peak counter reset per phase: {swap['hwm_bytes'] is not None})\n"
    )
    print(md_table(["what", "MiB", "× weights", "target"], rows))
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
