"""Which batching is fastest here: ours, transformers' padded `generate`, or its continuous
batching (`generate_batch`, paged attention)? Same prompts, same greedy lengths, one run.

    .venv/bin/python -m bench.batching --checkpoint-dir data/bench-ck
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.report import default_out, md_table, run_info, setup_logging, write_json
from bench.state import DEFAULT_MODEL, bench_prompts, prepare_state, workdir_for
from core.modeling.decode import Row, decode_batch
from core.modeling.loader import load_checkpoint
from core.modeling.params import SamplingParams

log = logging.getLogger("bench.batching")


def ours(model: Any, tok: Any, ids: Sequence[list[int]], new: int, batch: int) -> tuple[float, int]:
    tokens = 0
    start = time.perf_counter()
    for b in range(0, len(ids), batch):
        rows = [
            Row(prompt_ids=list(i), params=SamplingParams(max_new_tokens=new))
            for i in ids[b : b + batch]
        ]
        decode_batch(model, tok, rows)
        # All three stop at EOS, so each counts the tokens before EOS.
        tokens += sum(len(r.generated) for r in rows)
    return time.perf_counter() - start, tokens


def hf_padded(
    model: Any, tok: Any, ids: Sequence[list[int]], new: int, batch: int
) -> tuple[float, int]:
    tokens = 0
    start = time.perf_counter()
    for b in range(0, len(ids), batch):
        chunk = ids[b : b + batch]
        width = max(len(x) for x in chunk)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in chunk])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=pad,
        )
        gen = out[:, width:]
        tokens += int(sum(_length(row.tolist(), tok.eos_token_id) for row in gen))
    return time.perf_counter() - start, tokens


def _length(row: list[int], eos: int) -> int:
    return row.index(eos) if eos in row else len(row)


def hf_continuous(model: Any, ids: Sequence[list[int]], new: int, batch: int) -> tuple[float, int]:
    from transformers import GenerationConfig

    cfg = GenerationConfig(  # type: ignore[no-untyped-call]
        max_new_tokens=new,
        do_sample=False,
        max_batch_tokens=batch * 64,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
    )
    start = time.perf_counter()
    outputs = model.generate_batch(
        inputs=[list(x) for x in ids], generation_config=cfg, progress_bar=False
    )
    seconds = time.perf_counter() - start
    tokens = 0
    for out in outputs.values():
        gen = list(getattr(out, "generated_tokens", []) or [])
        tokens += _length(gen, model.config.eos_token_id)
    return seconds, tokens


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--checkpoint-dir")
    ap.add_argument("--workdir")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default=default_out("batching"))
    args = ap.parse_args(argv)
    setup_logging()
    with workdir_for(args.workdir, "selflm-bench-batching-") as wd:
        state = prepare_state(args.model, args.checkpoint_dir, wd)
        loaded = load_checkpoint(Path(state.base_path), torch.device("cpu"), torch.float32)
        model, tok = loaded.model, loaded.tokenizer
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in bench_prompts(args.prompts)]
        decode_batch(model, tok, [Row(prompt_ids=ids[0], params=SamplingParams(4))])  # warm
        s_ours, t_ours = ours(model, tok, ids, args.max_new_tokens, args.batch)
        s_pad, t_pad = hf_padded(model, tok, ids, args.max_new_tokens, args.batch)
        results: dict[str, dict[str, Any]] = {
            "selflm decode_batch (padded, finished rows leave)": {
                "seconds": s_ours,
                "tokens": t_ours,
            },
            "transformers generate (padded static batch)": {"seconds": s_pad, "tokens": t_pad},
        }
        try:
            s_cb, t_cb = hf_continuous(model, ids, args.max_new_tokens, args.batch)
            results["transformers generate_batch (continuous, paged)"] = {
                "seconds": s_cb,
                "tokens": t_cb,
            }
        except Exception as e:  # report, do not hide, a path that does not run here
            log.warning("generate_batch failed: %s: %s", type(e).__name__, e)
            results["transformers generate_batch (continuous, paged)"] = {
                "seconds": 0.0,
                "tokens": 0,
                "error": f"{type(e).__name__}: {e}",
            }
        rows = []
        for name, r in results.items():
            tps = r["tokens"] / r["seconds"] if r["seconds"] else 0.0
            r["tokens_per_s"] = tps
            rows.append([name, int(r["tokens"]), f"{r['seconds']:.1f}", f"{tps:.1f}"])
        print(md_table(["engine", "tokens", "seconds", "tokens/s"], rows))
        data = {
            "run": run_info(argv),
            "prompts": args.prompts,
            "batch": args.batch,
            "max_new_tokens": args.max_new_tokens,
            "results": results,
        }
        write_json(args.out, data)
        return data


if __name__ == "__main__":
    main()
