"""oneDNN's primitive caches and a serving process's memory, over many prompt lengths.

A long-running server meets a new matmul shape with every prompt length it prefills; in
bf16 on a CPU each shape compiles a oneDNN primitive, kept (each with buffers of its own) by
oneDNN's cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, default 1024) and by PyTorch's ideep
cache (``LRU_CACHE_CAPACITY``, default 1024). ``bench.memory``'s 5 s of steady load meets a
few dozen shapes; this meets ``--shapes``.

For each setting in ``--caps`` (``N``: both caches at N; ``N/M``: oneDNN's at N, ideep's at
M; the first is the baseline, the defaults) a fresh child process loads the checkpoint in the
serving dtype, prefills one prompt of each length 1, 3, 5, … (only the last position's
logits, as the engine does), and reports its anonymous RSS (``RssAnon``, after
``malloc_trim``) before and after, and the sweep's seconds.

    .venv/bin/python -m bench.onednn_cache --checkpoint-dir data/bench-ck
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.report import md_table, run_info, setup_logging, write_json
from bench.rss import proc_status
from bench.state import prepare_state, workdir_for
from core.modeling.onednn import IDEEP_CACHE_ENV, ONEDNN_CACHE_ENV

log = logging.getLogger("bench.onednn_cache")
MIB = 1024 * 1024


def _rss_anon() -> int:
    return proc_status(os.getpid()).get("RssAnon", 0)


def child(path: str, shapes: int, dtype: str) -> dict[str, Any]:
    """In a fresh process: the checkpoint's anonymous memory before and after the sweep."""
    import torch
    from transformers import AutoModelForCausalLM

    from core.malloc import trim

    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model.eval()  # type: ignore[no-untyped-call]
    model(input_ids=torch.ones(1, 4, dtype=torch.long))
    trim()
    before = _rss_anon()
    gen = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for n in range(1, 2 * shapes, 2):
        ids = torch.randint(0, 1000, (1, n), generator=gen)
        model(input_ids=ids, logits_to_keep=1)
    seconds = time.perf_counter() - started
    trim()
    return {"before_bytes": before, "after_bytes": _rss_anon(), "seconds": seconds}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="bench.onednn_cache", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--checkpoint-dir", help="checkpoint store to reuse")
    ap.add_argument(
        "--caps",
        default="1024,64/1024,64",
        help="N (both caches) or N/M (oneDNN's, ideep's); the first is the baseline",
    )
    ap.add_argument("--shapes", type=int, default=200, help="distinct prompt lengths")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.shapes, args.dtype)))
        return {}
    setup_logging()
    with workdir_for(None, "selflm-bench-onednn-") as wd:
        path = str(prepare_state(args.model, args.checkpoint_dir, wd).base_path)
    rows, results = [], []
    for setting in args.caps.split(","):
        onednn, _, ideep = setting.partition("/")
        cap, lru = int(onednn), int(ideep or onednn)
        env = {**os.environ, ONEDNN_CACHE_ENV: str(cap), IDEEP_CACHE_ENV: str(lru)}
        cmd = [sys.executable, "-m", "bench.onednn_cache", "--child", path]
        cmd += ["--shapes", str(args.shapes), "--dtype", args.dtype]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        r = {"capacity": cap, "ideep_capacity": lru}
        r.update(json.loads(out.stdout.strip().splitlines()[-1]))
        results.append(r)
        grown = (r["after_bytes"] - r["before_bytes"]) / MIB
        log.info("caches %d/%d: +%.0f MiB in %.1f s", cap, lru, grown, r["seconds"])
        mib = [r["before_bytes"] / MIB, r["after_bytes"] / MIB, grown, r["seconds"]]
        rows.append([cap, lru, *mib])
    title = f"oneDNN primitive caches ({args.model}, {args.dtype}, {args.shapes} prompt lengths)"
    print(f"\n### {title}\n")
    head = ["oneDNN cap", "ideep cap", "before MiB", "after MiB", "grown MiB", "sweep s"]
    print(md_table(head, rows))
    data = {"bench": "onednn_cache", "model": args.model, "dtype": args.dtype,
            "shapes": args.shapes, "results": results, "run": run_info(argv)}  # fmt: skip
    if args.out:
        write_json(args.out, data)
    return data


if __name__ == "__main__":
    main()
