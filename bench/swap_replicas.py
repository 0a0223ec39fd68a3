"""Hot swap across replicas: two API processes sharing the database and checkpoint store,
Redis pub/sub on, each under its own client load; one promotion over HTTP.

Reports per replica: requests, failed, the largest gap between completed responses around
the swap, and the time from the promotion to its first response from the new version.

    .venv/bin/python -m bench.swap_replicas --checkpoint-dir data/bench-ck
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from typing import Any

import httpx

from bench.load import Load, largest_gap
from bench.report import default_out, md_table, run_info, setup_logging, write_json
from bench.server import health, start_server, stop_server, warm_up
from bench.state import DEFAULT_MODEL, add_candidate, bench_prompts, prepare_state, workdir_for

log = logging.getLogger("bench.swap_replicas")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--checkpoint-dir")
    ap.add_argument("--workdir")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4, help="clients per replica")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--pre-s", type=float, default=5.0)
    ap.add_argument("--post-s", type=float, default=3.0)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    ap.add_argument("--out", default=default_out("swap_replicas"))
    args = ap.parse_args(argv)
    setup_logging()
    prompts = bench_prompts(32)
    env = {"SELFLM_REDIS_URL": args.redis_url} if args.redis_url else {}
    with workdir_for(args.workdir, "selflm-bench-replicas-") as wd:
        state = prepare_state(args.model, args.checkpoint_dir, wd)
        add_candidate(state, 2)
        servers = [start_server(state, env) for _ in range(args.replicas)]
        try:
            for s in servers:
                warm_up(s, prompts, 1)
            loads = [Load(s.url, prompts, args.clients, args.max_new_tokens) for s in servers]
            for load in loads:
                load.__enter__()
            time.sleep(args.pre_s)
            promoted = time.monotonic()
            r = httpx.post(f"{servers[0].url}/checkpoints/2/promote", timeout=120)
            r.raise_for_status()
            swapped = [0.0] * len(servers)
            while not all(swapped) and time.monotonic() - promoted < 300:
                for i, s in enumerate(servers):
                    if not swapped[i] and health(s).get("serving_version") == 2:
                        swapped[i] = time.monotonic()
                time.sleep(0.05)
            # Keep the load on until every replica has answered from v2 (then post_s more).
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not all(
                any(o.version == 2 for o in list(load.results)) for load in loads
            ):
                time.sleep(0.1)
            time.sleep(args.post_s)
            for load in loads:
                load.__exit__()
        finally:
            for s in servers:
                stop_server(s)
            state.db.dispose()
    rows, per = [], []
    for i, load in enumerate(loads):
        res = sorted(load.results, key=lambda o: o.done)
        first_new = min((o.done for o in res if o.version == 2), default=0.0)
        end = max(swapped[i], first_new)
        item = {
            "replica": i,
            "requests": len(res),
            "failed": sum(1 for o in res if o.status != 200),
            "versions_seen": sorted({o.version for o in res if o.version is not None}),
            "largest_gap_ms": largest_gap([o.done for o in res], promoted, end) * 1000,
            "promote_to_serving_ms": (swapped[i] - promoted) * 1000 if swapped[i] else None,
            "promote_to_first_v2_response_ms": (first_new - promoted) * 1000 if first_new else None,
        }
        per.append(item)
        rows.append(
            [
                i,
                item["requests"],
                item["failed"],
                f"{item['largest_gap_ms']:.0f}",
                f"{item['promote_to_serving_ms']:.0f}",
                f"{item['promote_to_first_v2_response_ms']:.0f}",
            ]
        )
    print(
        f"\n### Swap across {args.replicas} replicas ({args.model}, {args.clients} clients "
        f"each, pub/sub {'on' if args.redis_url else 'off'})\n"
    )
    print(
        md_table(
            [
                "replica",
                "requests",
                "failed",
                "largest gap ms",
                "promotion → serving ms",
                "promotion → first v2 response ms",
            ],
            rows,
        )
    )
    data = {"run": run_info(argv), "replicas": per, "promote_status": r.status_code}
    write_json(args.out, data)
    return data


if __name__ == "__main__":
    main()
