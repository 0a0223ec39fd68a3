"""How noisy is the quality study's diversity probe? One fixed checkpoint, several seeds.

The study measures distinct-2 and the trigram repetition rate of one sample per prompt on a
fixed prompt set with a fixed sampling seed. This draws the same probe with other seeds on the
*same* weights, so the spread is pure sampling noise: a change between two models smaller than
it cannot be told apart from chance.

    .venv/bin/python -m studies.quality.noise data/quality/<model>/_base/checkpoints/default/v000001
    .venv/bin/python -m studies.quality.noise CHECKPOINT --domain pgsql   # docs/quality/pgsql/
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from studies.quality import domains
from studies.quality.measure import DEFAULT_UNRELATED, FULL_MEASURE, MeasureConfig, build_eval_sets

log = logging.getLogger("studies.quality.noise")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m studies.quality.noise", description=__doc__)
    ap.add_argument("checkpoint", type=Path, help="a checkpoint directory")
    ap.add_argument("--seeds", default="7,8,9,10,11", help="sampling seeds (7 is the study's)")
    ap.add_argument("--diversity-prompts", type=int, default=FULL_MEASURE.diversity_prompts)
    ap.add_argument("--max-new-tokens", type=int, default=FULL_MEASURE.max_new_tokens)
    ap.add_argument("--domain", default=None, help="pydoc (default), pgsql or a corpus path")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: probe_noise.json in the domain's results directory (the report reads "
        "it there for the repetition target's band)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    import torch

    from core.modeling.loader import load_checkpoint
    from worker.rounds.generate import generate_samples
    from worker.rounds.textstats import diversity

    cfg = MeasureConfig(
        **{
            **asdict(FULL_MEASURE),
            "test_passages": 1,
            "unrelated_passages": 1,
            "diversity_prompts": args.diversity_prompts,
            "max_new_tokens": args.max_new_tokens,
        }
    )
    domain = domains.resolve(args.domain)
    args.out = args.out or domain.out / "probe_noise.json"
    sets = build_eval_sets(domain.path, DEFAULT_UNRELATED, cfg)
    loaded = load_checkpoint(args.checkpoint, torch.device("cpu"), torch.float32)
    runs: list[dict[str, float]] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        t = time.perf_counter()
        gen = generate_samples(
            loaded.model,
            loaded.tokenizer,
            sets.prompts,
            1,
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.top_p,
            seed,
            16,
        )
        d = diversity([s.text for s in gen.samples])
        runs.append(
            {
                "seed": seed,
                "distinct_2": d.distinct_2,
                "repetition_rate": d.repetition_rate,
                "seconds": time.perf_counter() - t,
            }
        )
        log.info("seed %d: distinct-2 %.4f, repetition %.4f", seed, d.distinct_2, d.repetition_rate)
    d2 = [r["distinct_2"] for r in runs]
    rep = [r["repetition_rate"] for r in runs]
    summary = {
        "checkpoint": str(args.checkpoint),
        "prompts": len(sets.prompts),
        "max_new_tokens": cfg.max_new_tokens,
        "runs": runs,
        "distinct_2_mean": statistics.mean(d2),
        "distinct_2_sd": statistics.stdev(d2) if len(d2) > 1 else 0.0,
        "repetition_mean": statistics.mean(rep),
        "repetition_sd": statistics.stdev(rep) if len(rep) > 1 else 0.0,
    }
    # The SD over seeds of the whole-probe statistic is the standard error of one
    # measurement; the study's targets and a gate's tolerance should be at least 2 of it.
    summary["distinct_2_2se"] = 2 * (statistics.stdev(d2) if len(d2) > 1 else 0.0)
    summary["repetition_2se"] = 2 * (statistics.stdev(rep) if len(rep) > 1 else 0.0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    return summary


if __name__ == "__main__":
    main()
