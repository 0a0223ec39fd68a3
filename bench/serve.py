"""Serving benchmark: aggregate generated tokens/s and latency against the real HTTP service.

Starts ``selflm serve`` (fresh SQLite database; the base checkpoint imported once into
``--checkpoint-dir`` and reused), then for each concurrency level C runs C client threads
that send a fixed number of /generate requests from a fixed prompt list. Generated tokens
come from the ``x-generated-tokens`` header. After the server has stopped, the reference
loop (sequential batch-1 ``model.generate`` in float32 on the same checkpoint) generates for
the same prompts exactly the lengths the server produced, and transformers' own padded
``generate`` runs the same prompts in batches of ``--padded-batch`` (same sampling mode and
``max_new_tokens``); the ratios of every level to both are printed.

    .venv/bin/python -m bench.serve --checkpoint-dir data/bench-ck
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from bench.reference import load_reference, padded_generate, reference_generate
from bench.report import (
    default_out,
    md_table,
    percentile,
    ratio,
    run_info,
    setup_logging,
    write_json,
)
from bench.server import (
    Server,
    generate_body,
    parse_env,
    server_info,
    start_server,
    stop_server,
    warm_up,
)
from bench.state import DEFAULT_MODEL, bench_prompts, prepare_state, workdir_for
from core.modeling.device import pick_device

log = logging.getLogger("bench.serve")


@dataclass(frozen=True)
class _Reply:
    prompt: int
    status: int
    latency: float
    tokens: int


def run_level(
    server: Server,
    prompts: Sequence[str],
    concurrency: int,
    requests: int,
    max_new_tokens: int,
    sample: bool,
    seed: int,
    temperature: float,
    top_p: float,
) -> tuple[dict[str, Any], list[_Reply]]:
    todo: queue.Queue[int] = queue.Queue()
    for i in range(requests):
        todo.put(i)
    replies: list[_Reply] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=1800) as c:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                p = i % len(prompts)
                body = generate_body(
                    prompts[p], max_new_tokens, sample, seed + i, temperature, top_p
                )
                t0 = time.perf_counter()
                try:
                    r = c.post(server.url + "/generate", json=body)
                    status = r.status_code
                    tokens = int(r.headers.get("x-generated-tokens", 0)) if status == 200 else 0
                except httpx.HTTPError as e:
                    log.warning("request %d failed: %s", i, e)
                    status, tokens = 0, 0
                reply = _Reply(p, status, time.perf_counter() - t0, tokens)
                with lock:
                    replies.append(reply)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    ok = [r for r in replies if r.status == 200]
    latencies = [r.latency for r in ok]
    tokens = sum(r.tokens for r in ok)
    level = {
        "concurrency": concurrency,
        "requests": len(replies),
        "failed": len(replies) - len(ok),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "requests_per_s": len(ok) / seconds if seconds > 0 else 0.0,
        "p50_latency_s": percentile(latencies, 50),
        "p95_latency_s": percentile(latencies, 95),
        "mean_tokens_per_request": tokens / len(ok) if ok else 0.0,
    }
    log.info(
        "C=%d: %d requests (%d failed), %.1f tokens/s, p50 %.2fs p95 %.2fs",
        concurrency,
        level["requests"],
        level["failed"],
        level["tokens_per_s"],
        level["p50_latency_s"],
        level["p95_latency_s"],
    )
    return level, replies


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="base model (SELFLM_BASE_MODEL form)")
    ap.add_argument(
        "--checkpoint-dir",
        help="checkpoint store to reuse (the base model is imported there on first use)",
    )
    ap.add_argument("--workdir", help="keep database and server log here (default: temp dir)")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--requests", type=int, default=0, help="per level (default max(16, 4·C))")
    ap.add_argument("--prompts", type=int, default=32, help="size of the fixed prompt list")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--sample", action="store_true", help="also run every level with sampling")
    ap.add_argument(
        "--modes",
        default="",
        help="comma-separated modes to run (greedy, sample); overrides --sample",
    )
    ap.add_argument(
        "--padded-batch",
        type=int,
        default=32,
        help="batch of the transformers padded-generate baseline (0: skip it)",
    )
    ap.add_argument(
        "--baseline-dtypes",
        default="float32",
        help="comma-separated dtypes the baselines run in (float32, bfloat16); the ratios "
        "are against the server's own dtype where it is one of them",
    )
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=2, help="warm-up requests before measuring")
    ap.add_argument(
        "--ref-prompts", type=int, default=8, help="prompts the reference loop runs (per mode)"
    )
    ap.add_argument(
        "--device",
        default="auto",
        help="reference loop's device: auto (as the server) | cpu | cuda",
    )
    ap.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra server environment, e.g. SELFLM_MAX_BATCH_SIZE=32 (repeatable)",
    )
    ap.add_argument("--out", default=default_out("serve"))
    return ap.parse_args(argv)


def _lengths(replies: Sequence[_Reply], n_prompts: int, default: int) -> list[int]:
    """Per prompt, the median number of tokens the server generated for it."""
    seen: dict[int, list[int]] = defaultdict(list)
    for r in replies:
        if r.status == 200:
            seen[r.prompt].append(r.tokens)
    return [round(statistics.median(seen[p])) if seen[p] else default for p in range(n_prompts)]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_logging()
    levels_c = [int(c) for c in args.concurrency.split(",") if c.strip()]
    modes = ["greedy", "sample"] if args.sample else ["greedy"]
    if args.modes:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        if not set(modes) <= {"greedy", "sample"}:
            raise SystemExit(f"--modes: greedy and/or sample, not {args.modes!r}")
    prompts = bench_prompts(args.prompts, args.seed)
    extra_env = parse_env(args.server_env)
    results: dict[str, Any] = {
        "bench": "serve",
        "model": args.model,
        "max_new_tokens": args.max_new_tokens,
        "prompts": len(prompts),
        "run": run_info(argv),
        "server_env": extra_env,
        # Other work on the machine at the start (1, 5, 15-minute load averages).
        "load_avg": os.getloadavg(),
        "modes": {},
    }
    with workdir_for(args.workdir, "selflm-bench-serve-") as workdir:
        state = prepare_state(args.model, args.checkpoint_dir, workdir)
        results["checkpoint"] = str(state.base_path)
        replies: dict[str, list[_Reply]] = {m: [] for m in modes}
        levels: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        server = start_server(state, extra_env)
        try:
            results["server"] = {"startup_s": server.started_s, **server_info(server)}
            warm_up(server, prompts, args.warmup)
            for mode in modes:
                for c in levels_c:
                    n = args.requests or max(16, 4 * c)
                    level, got = run_level(
                        server,
                        prompts,
                        c,
                        n,
                        args.max_new_tokens,
                        mode == "sample",
                        args.seed,
                        args.temperature,
                        args.top_p,
                    )
                    levels[mode].append(level)
                    replies[mode].extend(got)
        finally:
            stop_server(server)
            state.db.dispose()

        # The baselines run only now, so they never compete with the server for the CPU.
        device = str(pick_device(args.device))
        server_dtype = str(results["server"].get("model_dtype", "float32"))
        dtypes = [d.strip() for d in args.baseline_dtypes.split(",") if d.strip()]
        for dtype in dtypes:
            _baselines(args, state.base_path, device, dtype, prompts, modes, replies, results)
        # The ratios are against the baselines in the server's own dtype where measured.
        key = server_dtype if server_dtype in dtypes else dtypes[0]
        for mode in modes:
            m = results["modes"][mode]
            ref, pad = m["baselines"][key]["reference"], m["baselines"][key].get("padded")
            for level in levels[mode]:
                level["ratio_vs_reference"] = ratio(level["tokens_per_s"], ref["tokens_per_s"])
                if pad is not None:
                    level["ratio_vs_padded"] = ratio(level["tokens_per_s"], pad["tokens_per_s"])
            m["levels"], m["ratios_against"] = levels[mode], key

    rows = []
    for mode, m in results["modes"].items():
        key = m["ratios_against"]
        ref_tps = m["baselines"][key]["reference"]["tokens_per_s"]
        pad_tps = m["baselines"][key].get("padded", {}).get("tokens_per_s")
        for dtype, b in m["baselines"].items():
            tps = b["reference"]["tokens_per_s"]
            rows.append(
                [
                    mode,
                    f"reference (batch-1 generate, {dtype})",
                    b["reference"]["sequences"],
                    tps,
                    "-",
                    "-",
                    ratio(tps, ref_tps),
                    ratio(tps, pad_tps) if pad_tps else "-",
                ]
            )
            pad = b.get("padded")
            if pad:
                rows.append(
                    [
                        mode,
                        f"transformers generate, padded batch {pad['batch']} ({dtype})",
                        pad["sequences"],
                        pad["tokens_per_s"],
                        "-",
                        "-",
                        ratio(pad["tokens_per_s"], ref_tps),
                        ratio(pad["tokens_per_s"], pad_tps) if pad_tps else "-",
                    ]
                )
        for lv in m["levels"]:
            rows.append(
                [
                    mode,
                    f"selflm serve, C={lv['concurrency']}",
                    f"{lv['requests']} ({lv['failed']} failed)",
                    lv["tokens_per_s"],
                    lv["p50_latency_s"],
                    lv["p95_latency_s"],
                    lv["ratio_vs_reference"],
                    lv.get("ratio_vs_padded", "-"),
                ]
            )
    srv = results["server"]
    print(
        f"\n### Serving ({args.model}, server {srv.get('model_dtype')}/"
        f"{srv.get('model_device_type')}, max batch {srv.get('max_batch_size')}, "
        f"max_new_tokens {args.max_new_tokens})\n"
    )
    print(f"Ratios against the baselines in {key}.\n")
    headers = ["mode", "run", "requests", "tokens/s", "p50 s", "p95 s", "× reference"]
    print(md_table([*headers, "× padded"], rows))
    write_json(args.out, results)
    return results


def _baselines(
    args: argparse.Namespace,
    base_path: Any,
    device: str,
    dtype: str,
    prompts: list[str],
    modes: list[str],
    replies: dict[str, list[_Reply]],
    results: dict[str, Any],
) -> None:
    """The reference loop and transformers' padded generate in ``dtype``, same prompts and
    lengths as the server's replies, into ``results["modes"][mode]["baselines"][dtype]``."""
    import torch

    model, tok = load_reference(base_path, device)
    model.to(getattr(torch, dtype))
    n_ref = min(args.ref_prompts, len(prompts))
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts[:n_ref]]
    for mode in modes:
        lengths = _lengths(replies[mode], len(prompts), args.max_new_tokens)[:n_ref]
        log.info("reference loop (%s, %s): %d prompts, %d tokens", mode, dtype, n_ref, sum(lengths))
        ref = reference_generate(
            model,
            tok,
            ids,
            lengths,
            sample=mode == "sample",
            seed=args.seed,
            temperature=args.temperature,
            top_p=args.top_p,
        )
        out: dict[str, Any] = {"reference": {**ref.as_dict(), "dtype": dtype, "device": device}}
        if args.padded_batch > 0:
            all_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
            log.info(
                "transformers padded generate (%s, %s), batch %d", mode, dtype, args.padded_batch
            )
            padded = padded_generate(
                model,
                tok,
                all_ids,
                args.max_new_tokens,
                batch=args.padded_batch,
                sample=mode == "sample",
                seed=args.seed,
                temperature=args.temperature,
                top_p=args.top_p,
            )
            out["padded"] = {
                **padded.as_dict(),
                "batch": args.padded_batch,
                "dtype": dtype,
                "device": device,
            }
        results["modes"].setdefault(mode, {}).setdefault("baselines", {})[dtype] = out
    del model


if __name__ == "__main__":
    main()
    sys.exit(0)
