"""What serving in reduced precision costs in perplexity (issue 14: allowed only with its
perplexity cost measured and ≤ 1%).

The bundled model is scored in float32 (the baseline, in the same run) and in each lower
precision the engine can pick (`SELFLM_DTYPE`), on the domain test splits the quality study
measures (pydoc and the PostgreSQL reference) and on the unrelated corpus.

    .venv/bin/python -m bench.precision --out docs/bench/precision.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from bench.report import write_json
from core.modeling.device import cpu_has_fast_bf16
from core.modeling.loader import load_base
from studies.quality.domains import resolve
from studies.quality.measure import DEFAULT_UNRELATED, MeasureConfig, build_eval_sets
from worker.rounds.evaluate import perplexity

MODEL = "bundled:smollm2-135m-instruct"


def eval_sets(limit: int) -> dict[str, list[str]]:
    """The quality study's sets (same splits and seeded samples), ``limit`` passages each."""
    cfg = MeasureConfig(
        test_passages=limit, unrelated_passages=limit, diversity_prompts=1, max_new_tokens=8
    )
    out: dict[str, list[str]] = {}
    for key in ("pydoc", "pgsql"):
        sets = build_eval_sets(resolve(key).path, DEFAULT_UNRELATED, cfg)
        out[f"{key} test"] = sets.test
    out["unrelated"] = sets.unrelated
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, default=64, help="per set")
    ap.add_argument("--out", default="docs/bench/precision.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    sets = eval_sets(args.passages)
    base = load_base(MODEL)
    rows: list[dict[str, Any]] = []
    ppl32: dict[str, float] = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = base.model.to(dtype).eval()
        for name, texts in sets.items():
            t0 = time.perf_counter()
            with torch.inference_mode():
                r = perplexity(model, base.tokenizer, texts)
            if dtype == torch.float32:
                ppl32[name] = r.ppl
            rows.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "set": name,
                    "tokens": r.tokens,
                    "ppl": r.ppl,
                    "vs_float32": r.ppl / ppl32[name] - 1,
                    "seconds": time.perf_counter() - t0,
                }
            )
    print(f"fast bf16 on this CPU: {cpu_has_fast_bf16()}\n")
    print("| dtype | set | tokens | ppl | vs float32 | seconds | target |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        target = "" if row["dtype"] == "float32" else "≤ +1%"
        print(
            f"| {row['dtype']} | {row['set']} | {row['tokens']} | {row['ppl']:.3f} | "
            f"{100 * row['vs_float32']:+.2f}% | {row['seconds']:.1f} | {target} |"
        )
    write_json(Path(args.out), {"model": MODEL, "fast_bf16": cpu_has_fast_bf16(), "rows": rows})


if __name__ == "__main__":
    main()
