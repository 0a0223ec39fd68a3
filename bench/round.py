"""Round benchmark: generate- and update-stage tokens/s versus the reference loop, in process.

Loads the checkpoint (``--checkpoint``, the champion of ``--database-url``, or the base
model) in float32 and measures

* generate: ``generate_samples`` (batched, as a round runs it) against sequential batch-1
  ``model.generate`` with sampling on the same prompts, each reference sequence forced to
  the length the batched run produced for it (same token count on both sides;
  ``--ref-samples`` limits the reference to the first N samples, compared per token);
* update: ``finetune`` as a round runs it (one epoch, autocast ``auto`` and ``off``; chunked
  LM head, micro-batches), and as it ran before (full logits, whole batches), against the
  reference's
  per-sample float32 loop (Adam, batch 1, ``loss.backward()`` per sample) on the same
  windows of the same texts (generated samples topped up with corpus passages), counting
  the same predicted tokens. Each run starts from a fresh copy of the loaded weights;
  ``--train-warmup N`` first runs N untimed steps of each on a throwaway copy (first-use
  costs: CUDA kernels and workspaces, optimizer state).

    .venv/bin/python -m bench.round --checkpoint-dir data/bench-ck
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.reference import reference_generate, reference_train
from bench.report import default_out, md_table, ratio, run_info, setup_logging, write_json
from bench.state import DEFAULT_MODEL, bench_prompts, prepare_state, workdir_for
from core.modeling.device import dtype_name, pick_device
from core.modeling.loader import load_checkpoint
from worker.rounds.data import load_corpus, passages
from worker.rounds.evaluate import encode_texts, split_windows
from worker.rounds.generate import GenerateResult, generate_samples
from worker.rounds.lm_loss import full_logits
from worker.rounds.stages import MICRO_BATCH_TOKENS
from worker.rounds.train_modes import autocast_dtype
from worker.rounds.update import TrainConfig, finetune

log = logging.getLogger("bench.round")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench.round", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="base model (SELFLM_BASE_MODEL form)")
    ap.add_argument("--checkpoint", help="a checkpoint directory to load (overrides the rest)")
    ap.add_argument("--database-url", help="load this database's champion checkpoint")
    ap.add_argument("--lineage", default="default")
    ap.add_argument(
        "--checkpoint-dir",
        help="checkpoint store to reuse (the base model is imported there on first use)",
    )
    ap.add_argument("--workdir", help="keep the scratch database here (default: temp dir)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    # generate stage (round defaults: 4 samples per prompt, 48 new tokens, batch 16)
    ap.add_argument("--samples", type=int, default=16, help="generated samples in all")
    ap.add_argument("--samples-per-prompt", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--generate-batch-size", type=int, default=16)
    ap.add_argument(
        "--ref-samples",
        type=int,
        default=0,
        help="reference generate runs only the first N samples (default 0: all)",
    )
    # update stage (round defaults: batch 8, max_length 256, lr 5e-5)
    ap.add_argument(
        "--texts", type=int, default=24, help="training texts: the samples, then passages"
    )
    ap.add_argument("--passage-words", type=int, default=96, help="word cap of corpus passages")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--learning-rate", type=float, default=5e-5)
    ap.add_argument(
        "--train-warmup",
        type=int,
        default=0,
        help="untimed training steps before each timed update run (default 0)",
    )
    ap.add_argument(
        "--train-repeat",
        type=int,
        default=1,
        help="run the autocast auto/off pair N times, alternating; the last pass is reported",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=default_out("round"))
    return ap.parse_args(argv)


def _champion_path(database_url: str, lineage: str) -> Path:
    from core import registry
    from core.db.session import Database

    db = Database(database_url)
    try:
        champ = registry.champion(db, lineage)
        if champ is None:
            raise SystemExit(f"no champion in lineage {lineage!r} of {database_url}")
        return champ.path
    finally:
        db.dispose()


def _training_texts(samples: Sequence[str], n: int, words: int, seed: int) -> list[str]:
    texts = list(samples[:n])
    if len(texts) < n:
        pool = passages(load_corpus(None).train, max_words=words, rng=random.Random(seed))
        texts += pool[: n - len(texts)]
    return texts


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_logging()
    device = pick_device(args.device)
    results: dict[str, Any] = {"bench": "round", "model": args.model, "run": run_info(argv)}
    with workdir_for(args.workdir, "selflm-bench-round-") as workdir:
        if args.checkpoint:
            path = Path(args.checkpoint).resolve()
        elif args.database_url:
            path = _champion_path(args.database_url, args.lineage)
        else:
            state = prepare_state(args.model, args.checkpoint_dir, workdir)
            path = state.base_path
            state.db.dispose()
        results["checkpoint"] = str(path)
        loaded = load_checkpoint(path, device, torch.float32)
    model, tok = loaded.model, loaded.tokenizer
    results["device"] = str(device)

    # ---- generate
    n_prompts = math.ceil(args.samples / args.samples_per_prompt)
    prompts = bench_prompts(n_prompts, args.seed)

    def run_generate(ps: Sequence[str], max_new_tokens: int) -> GenerateResult:
        return generate_samples(
            model,
            tok,
            ps,
            args.samples_per_prompt,
            max_new_tokens,
            args.temperature,
            args.top_p,
            args.seed,
            args.generate_batch_size,
        )

    run_generate(prompts[:1], 2)  # warm-up: first-call allocations are not the stage's cost
    gen = run_generate(prompts, args.max_new_tokens)
    log.info("batched generate: %d tokens, %.1f tokens/s", gen.tokens, gen.tokens_per_s)
    ref_samples = gen.samples[: args.ref_samples] if args.ref_samples > 0 else gen.samples
    ref_gen = reference_generate(
        model,
        tok,
        [s.prompt_ids for s in ref_samples],
        [len(s.ids) for s in ref_samples],
        sample=True,
        seed=args.seed,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    log.info("reference generate: %d tokens, %.1f tokens/s", ref_gen.tokens, ref_gen.tokens_per_s)
    results["generate"] = {
        "prompts": len(prompts),
        "samples": len(gen.samples),
        "tokens": gen.tokens,
        "seconds": gen.seconds,
        "tokens_per_s": gen.tokens_per_s,
        "batch_size": args.generate_batch_size,
        "dtype": dtype_name(next(model.parameters()).dtype),
        "max_new_tokens": args.max_new_tokens,
        "reference": ref_gen.as_dict(),
        "ratio_vs_reference": ratio(gen.tokens_per_s, ref_gen.tokens_per_s),
    }

    # ---- update
    texts = _training_texts(
        [s.prompt + s.text for s in gen.samples], args.texts, args.passage_words, args.seed
    )
    windows = [w for _, w in split_windows(encode_texts(tok, texts), args.max_length)]
    windows = [w for w in windows if len(w) >= 2]
    update: dict[str, Any] = {
        "texts": len(texts),
        "windows": len(windows),
        "tokens": sum(len(w) - 1 for w in windows),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "warmup_steps": args.train_warmup,
    }
    passes: list[dict[str, Any]] = []
    # "full": the update as it ran before the memory work (full [B, T, V] logits, whole
    # batches), on autocast auto, as the same-run baseline of the round's own settings.
    for mode in [m for _ in range(max(1, args.train_repeat)) for m in ("auto", "off", "full")]:
        cfg = TrainConfig(
            learning_rate=args.learning_rate,
            epochs=1,
            batch_size=args.batch_size,
            max_length=args.max_length,
            autocast="auto" if mode == "full" else mode,
            seed=args.seed,
            micro_batch_tokens=0 if mode == "full" else MICRO_BATCH_TOKENS,
        )
        amp = autocast_dtype(cfg.autocast, device)
        with full_logits() if mode == "full" else contextlib.nullcontext():
            if args.train_warmup > 0:
                warm = copy.deepcopy(model)
                finetune(warm, tok, texts[: args.train_warmup * args.batch_size], [], cfg)
                del warm
            candidate = copy.deepcopy(model)
            res = finetune(candidate, tok, texts, [], cfg)
            del candidate
        log.info("finetune autocast %s (%s): %.1f tokens/s", mode, amp, res.tokens_per_s)
        passes.append({"autocast": mode, "tokens_per_s": res.tokens_per_s})
        # The last pass of each mode is reported: earlier ones carry one-time costs (CUDA
        # kernels loaded lazily on first use of a shape, allocator growth).
        update[f"autocast_{mode}"] = {
            "autocast_dtype": dtype_name(amp) if amp is not None else None,
            "tokens": res.tokens_trained,
            "seconds": res.tokens_trained / res.tokens_per_s if res.tokens_per_s else 0.0,
            "tokens_per_s": res.tokens_per_s,
        }
    update["passes"] = passes
    if args.train_warmup > 0:
        warm = copy.deepcopy(model)
        reference_train(warm, windows[: args.train_warmup], args.learning_rate, args.seed)
        del warm
    candidate = copy.deepcopy(model)
    ref_train = reference_train(candidate, windows, args.learning_rate, args.seed)
    del candidate
    log.info("reference training: %.1f tokens/s", ref_train.tokens_per_s)
    update["reference"] = ref_train.as_dict()
    for mode in ("auto", "off", "full"):
        entry = update[f"autocast_{mode}"]
        entry["ratio_vs_reference"] = ratio(entry["tokens_per_s"], ref_train.tokens_per_s)
        if entry["tokens"] != ref_train.tokens:
            log.warning(
                "token counts differ: finetune %d, reference %d", entry["tokens"], ref_train.tokens
            )
    results["update"] = update
    if device.type == "cuda":
        results["cuda_max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20

    g, u = results["generate"], results["update"]
    rows = [
        [
            "generate",
            f"generate_samples (batch {args.generate_batch_size}, {g['dtype']})",
            g["tokens"],
            g["tokens_per_s"],
            g["reference"]["tokens_per_s"],
            g["ratio_vs_reference"],
        ]
    ]
    for mode in ("auto", "off", "full"):
        e = u[f"autocast_{mode}"]
        amp_name = e["autocast_dtype"] or "none"
        what = (
            f"finetune before the memory work (full logits, whole batches; auto → {amp_name})"
            if mode == "full"
            else f"finetune (batch {args.batch_size}, autocast {mode} → {amp_name})"
        )
        rows.append(
            [
                "update",
                what,
                e["tokens"],
                e["tokens_per_s"],
                u["reference"]["tokens_per_s"],
                e["ratio_vs_reference"],
            ]
        )
    print(f"\n### Round stages ({args.model}, {device}, master weights float32)\n")
    print(
        md_table(["stage", "ours", "tokens", "tokens/s", "reference tokens/s", "× reference"], rows)
    )
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
