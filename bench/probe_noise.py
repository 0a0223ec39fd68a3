"""How many prompts does the decide stage's diversity probe need? Its noise at several sizes.

The round's probe (:class:`worker.rounds.diversity_gate.Probe`) samples one continuation per
prompt with a fixed seed, so one model always gets the same numbers. A candidate is another
model, whose samples differ from its parent's as a different seed's would even where its
weights changed nothing that matters: the spread of the probe over sampling seeds, on one
fixed model, is the noise any tolerance has to clear.

One generation pass draws ``K`` continuations (each with its own seed) for each of the
largest size's prompts; the probe's prompt draw is nested (its first 24 prompts are the
24-prompt probe's prompts, and so on), so every size reads the same pass. A seed draw of an
``n``-prompt probe is one continuation per prompt: the ``K`` draws made of continuation ``k``
of every prompt are real seed draws; ``--resamples`` more draws pick one of the ``K``
continuations per prompt at random, and their spread, scaled by ``√(K/(K−1))`` (a pick among
K fixed values has (K−1)/K of the variance of a fresh draw), estimates the seed noise. The
table gives the sd of distinct-2 and of trigram repetition, the standard error of a
candidate-minus-parent difference (√2·sd), and real held-out text's own numbers at that size
(:mod:`worker.rounds.realtext`).

    flock /work/wt/heavy.lock .venv/bin/python -m bench.probe_noise
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from bench.report import default_out, md_table, run_info, setup_logging, write_json
from bench.state import DEFAULT_MODEL
from core.modeling.loader import load_base
from worker.rounds.data import SPLIT_SEED, load_corpus
from worker.rounds.diversity_gate import SAMPLE_SEED, Probe
from worker.rounds.generate import generate_samples
from worker.rounds.realtext import real_diversity
from worker.rounds.textstats import diversity

log = logging.getLogger("bench.probe_noise")


def _stats(texts: list[str]) -> tuple[float, float]:
    d = diversity(texts)
    return d.distinct_2, d.repetition_rate


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="bench.probe_noise", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--sizes", default="24,64,128")
    ap.add_argument("--samples", type=int, default=3, help="K continuations per prompt")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    setup_logging()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    k = args.samples
    loaded = load_base(args.model)
    model, tok = loaded.model, loaded.tokenizer
    corpus = load_corpus(None, seed=SPLIT_SEED)
    probe = Probe.from_train(
        corpus.train, max(sizes), args.max_new_tokens, args.temperature, args.top_p, 16
    )
    assert sizes == sorted(sizes), "--sizes ascending"
    texts: list[str] = []  # prompt-major: prompt i's j-th continuation at i*k + j
    seconds, tokens, prev = 0.0, 0, 0
    rng = random.Random(0)
    rows: list[dict[str, Any]] = []
    for n in sizes:  # ascending; each size's new prompts only, results written as they come
        t = time.perf_counter()
        gen = generate_samples(
            model,
            tok,
            list(probe.prompts[prev:n]),
            k,
            args.max_new_tokens,
            args.temperature,
            args.top_p,
            SAMPLE_SEED + prev * k,
            args.batch_size,
        )
        seconds += time.perf_counter() - t
        tokens += gen.tokens
        texts += [s.text for s in gen.samples]
        prev = n
        direct = [_stats([texts[i * k + j] for i in range(n)]) for j in range(k)]
        draws = [
            _stats([texts[i * k + rng.randrange(k)] for i in range(n)])
            for _ in range(args.resamples)
        ]
        scale = math.sqrt(k / (k - 1))
        sd2 = statistics.stdev(d for d, _ in draws) * scale
        srep = statistics.stdev(r for _, r in draws) * scale
        real = real_diversity(corpus.dev, tok, n, args.max_new_tokens)
        rows.append(
            {
                "prompts": n,
                "distinct_2_mean": statistics.mean(d for d, _ in direct),
                "distinct_2_sd": sd2,
                "distinct_2_diff_se": math.sqrt(2) * sd2,
                "repetition_mean": statistics.mean(r for _, r in direct),
                "repetition_sd": srep,
                "repetition_diff_se": math.sqrt(2) * srep,
                "real_distinct_2": real.distinct_2,
                "real_repetition": real.repetition_rate,
                "seed_draws": [{"distinct_2": d, "repetition_rate": r} for d, r in direct],
                "probe_seconds_est": seconds * n / (n * k),
            }
        )
        log.info("n=%d: %s (%d tokens in %.0fs so far)", n, rows[-1], tokens, seconds)
        result = {
            "run": run_info(),
            "model": args.model,
            "samples_per_prompt": k,
            "resamples": args.resamples,
            "generate_seconds": seconds,
            "generated_tokens": tokens,
            "sizes": rows,
        }
        write_json(args.out or default_out("probe_noise"), result)
    headers = [
        "prompts",
        "d2 mean",
        "d2 sd",
        "d2 SE(diff)",
        "rep mean",
        "rep sd",
        "rep SE(diff)",
        "real d2",
        "real rep",
        "s/probe (est.)",
    ]
    table = [
        [
            r["prompts"],
            f"{r['distinct_2_mean']:.4f}",
            f"{r['distinct_2_sd']:.4f}",
            f"{r['distinct_2_diff_se']:.4f}",
            f"{r['repetition_mean']:.4f}",
            f"{r['repetition_sd']:.4f}",
            f"{r['repetition_diff_se']:.4f}",
            f"{r['real_distinct_2']:.4f}",
            f"{r['real_repetition']:.4f}",
            f"{r['probe_seconds_est']:.0f}",
        ]
        for r in rows
    ]
    print(md_table(headers, table))
    return result


if __name__ == "__main__":
    main()
