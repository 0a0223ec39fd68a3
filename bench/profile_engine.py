"""Where a decoding step's time goes: torch.profiler over the engine's continuous batching
(requests joining and leaving a batch of `--batch` rows) and over transformers' padded
``generate`` at the same batch size, same prompts, same sampling mode, in one run.

    .venv/bin/python -m bench.profile_engine --checkpoint-dir data/bench-ck --sample

Prints tokens/s of both and the top rows (self CPU time) of each profile; the JSON keeps
them (docs/benchmarks.md "What bounds the numbers").
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from bench.report import default_out, md_table, run_info, setup_logging, write_json
from bench.state import DEFAULT_MODEL, bench_prompts, prepare_state, workdir_for
from core.modeling.decode import Row, decode_batch
from core.modeling.loader import load_checkpoint
from core.modeling.params import SamplingParams

log = logging.getLogger("bench.profile_engine")


def _params(args: argparse.Namespace, i: int) -> SamplingParams:
    if args.sample:
        return SamplingParams(
            args.max_new_tokens,
            do_sample=True,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed + i,
        )
    return SamplingParams(args.max_new_tokens)


def ours(model: Any, tok: Any, ids: Sequence[list[int]], args: argparse.Namespace) -> int:
    """`--requests` rows through one continuous batch of at most `--batch` rows."""
    rows = [
        Row(prompt_ids=list(ids[i % len(ids)]), params=_params(args, i))
        for i in range(args.requests)
    ]
    waiting = list(rows[args.batch :])

    def admit(room: int) -> list[Row]:
        out = waiting[:room]
        del waiting[:room]
        return out

    decode_batch(model, tok, rows[: args.batch], admit=admit, max_rows=args.batch)
    return sum(len(r.generated) + (r.eos_token is not None) for r in rows)


def hf_padded(model: Any, tok: Any, ids: Sequence[list[int]], args: argparse.Namespace) -> int:
    """transformers' padded ``generate``, `--batch` prompts at a time, to EOS or the cap."""
    tokens = 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for b in range(0, args.requests, args.batch):
        chunk = [ids[i % len(ids)] for i in range(b, min(b + args.batch, args.requests))]
        width = max(len(x) for x in chunk)
        x = torch.tensor([[pad] * (width - len(c)) + list(c) for c in chunk])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        kw: dict[str, Any] = {"do_sample": args.sample, "pad_token_id": pad}
        if args.sample:
            torch.manual_seed(args.seed + b)
            kw.update(temperature=args.temperature, top_p=args.top_p)
        out = model.generate(
            input_ids=x, attention_mask=mask, max_new_tokens=args.max_new_tokens, **kw
        )
        for row in out[:, width:].tolist():
            # The EOS token counts (as the server counts it); padding after it does not.
            n = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
            tokens += n
    return tokens


def _top(prof: Any, n: int) -> list[dict[str, Any]]:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [
        {
            "name": e.key,
            "calls": e.count,
            "self_cpu_ms": e.self_cpu_time_total / 1000,
            "share": e.self_cpu_time_total / total,
        }
        for e in events[:n]
    ]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--checkpoint-dir")
    ap.add_argument("--workdir")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--sample", action="store_true")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=12, help="profile rows to keep")
    ap.add_argument("--label", default="", help="tag stored in the JSON (e.g. before/after)")
    ap.add_argument("--out", default=default_out("profile_engine"))
    args = ap.parse_args(argv)
    setup_logging()
    torch.set_grad_enabled(False)
    with workdir_for(args.workdir, "selflm-bench-profile-") as wd:
        state = prepare_state(args.model, args.checkpoint_dir, wd)
        loaded = load_checkpoint(Path(state.base_path), torch.device("cpu"), torch.float32)
        model, tok = loaded.model, loaded.tokenizer
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in bench_prompts(args.prompts)]
        decode_batch(model, tok, [Row(prompt_ids=ids[0], params=SamplingParams(4))])  # warm
        results: dict[str, Any] = {}
        runs = (
            ("selflm decode_batch (continuous)", ours),
            (f"transformers generate, padded batch {args.batch}", hf_padded),
        )
        for name, fn in runs:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                tokens = fn(model, tok, ids, args)
                seconds = time.perf_counter() - start
            top = _top(prof, args.top)
            results[name] = {
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "top": top,
            }
            log.info("%s: %d tokens in %.1fs (%.1f/s)", name, tokens, seconds, tokens / seconds)
            print(f"\n#### {name}: {tokens} tokens, {tokens / seconds:.1f} tokens/s (profiled)\n")
            print(
                md_table(
                    ["op", "calls", "self CPU ms", "share"],
                    [
                        [t["name"], t["calls"], f"{t['self_cpu_ms']:.0f}", f"{t['share']:.1%}"]
                        for t in top
                    ],
                )
            )
        data = {
            "run": run_info(argv),
            "label": args.label,
            "load_avg": os.getloadavg(),
            "batch": args.batch,
            "requests": args.requests,
            "max_new_tokens": args.max_new_tokens,
            "sample": args.sample,
            "results": results,
        }
        write_json(args.out, data)
        return data


if __name__ == "__main__":
    main()
