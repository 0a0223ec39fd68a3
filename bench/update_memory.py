"""Update-stage memory: peak RSS of one fine-tuning epoch under each activation-memory setting.

The round's update (:func:`worker.rounds.update.finetune`) on the bundled model and real
domain text (pydoc train passages), with the round's batch size and sequence length, once per
setting — the round's default (``MICRO_BATCH_TOKENS`` and ``GRADIENT_CHECKPOINTING`` in
:mod:`worker.rounds.stages`) against the settings before it — each in a fresh child process
(a clean heap), so the same run carries its baseline. Each child reports the kernel's peak
RSS (``VmHWM``, reset once the model is loaded, as the round's ``peak_rss_bytes`` does) and the
epoch's training tokens/s. ``bench.round_memory`` measures a whole round; this isolates the
stage that sets its peak, in about a minute per setting.

    .venv/bin/python -m bench.update_memory --checkpoint-dir data/bench-ck
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.report import default_out, md_table, ratio, run_info, setup_logging, write_json
from bench.state import DEFAULT_MODEL, workdir_for

log = logging.getLogger("bench.update_memory")

MIB = 1024 * 1024
# (name, micro-batch tokens, activation checkpointing); "default" reads the round's constants.
SETTINGS: dict[str, tuple[int | None, bool | None]] = {
    "before (512-token micro-batches)": (512, False),
    "256-token micro-batches": (256, False),
    "512 + checkpointing": (512, True),
    "default": (None, None),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench.update_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="base model (SELFLM_BASE_MODEL form)")
    ap.add_argument(
        "--checkpoint-dir", help="store holding (or to receive) the base checkpoint, reused"
    )
    ap.add_argument("--workdir", help="keep the scratch database here")
    ap.add_argument("--passages", type=int, default=24, help="train passages (default 24: 3 steps)")
    ap.add_argument(
        "--settings",
        default=",".join(SETTINGS),
        help="comma-separated names from: " + ", ".join(SETTINGS) + " (default: all)",
    )
    ap.add_argument("--out", default=default_out("update_memory"))
    return ap.parse_args(argv)


def child(path: str, micro: int | None, checkpointing: bool | None, passages: int) -> None:
    """One epoch of the round's fine-tuning on ``path``; prints one JSON line."""
    import random
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.round_params import RoundParams
    from worker.rounds import stages
    from worker.rounds.data import load_corpus
    from worker.rounds.data import passages as cut
    from worker.rounds.peak_rss import PeakRss
    from worker.rounds.update import TrainConfig, finetune

    p = RoundParams()
    texts = cut(load_corpus().train, rng=random.Random(0))[:passages]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peak = PeakRss()
    peak.reset()
    with tempfile.TemporaryDirectory() as spill:
        cfg = TrainConfig(
            learning_rate=p.learning_rate,
            epochs=1,
            batch_size=p.batch_size,
            max_length=p.max_length,
            micro_batch_tokens=stages.MICRO_BATCH_TOKENS if micro is None else micro,
            gradient_checkpointing=(
                stages.GRADIENT_CHECKPOINTING if checkpointing is None else checkpointing
            ),
            spill_dir=spill,
        )
        result = finetune(model, tok, texts, [], cfg)
    out = {
        "micro_batch_tokens": cfg.micro_batch_tokens,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "peak_rss_bytes": peak.read(),
        "tokens": result.tokens_trained,
        "tokens_per_s": result.tokens_per_s,
        "train_loss": result.epochs[-1].train_loss,
    }
    print(json.dumps(out))


def _run_child(path: Path, micro: int | None, checkpointing: bool | None, n: int) -> dict[str, Any]:
    code = (
        "import sys, json; from bench.update_memory import child; "
        "child(sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]))"
    )
    cmd = [sys.executable, "-c", code, str(path), json.dumps(micro), json.dumps(checkpointing)]
    done = subprocess.run(
        [*cmd, str(n)],
        cwd=Path(__file__).resolve().parents[1],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or not names:
        raise SystemExit(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    setup_logging()
    from core.store import weights_bytes

    results: dict[str, Any] = {"bench": "update_memory", "model": args.model, "run": run_info(argv)}
    with workdir_for(args.workdir, "selflm-bench-update-memory-") as workdir:
        from bench.state import prepare_state

        state = prepare_state(args.model, args.checkpoint_dir, workdir)
        base = state.base_path
        state.db.dispose()
        weights = weights_bytes(base)
        runs: dict[str, dict[str, Any]] = {}
        for name in names:
            micro, checkpointing = SETTINGS[name]
            log.info("setting %s", name)
            runs[name] = _run_child(base, micro, checkpointing, args.passages)
    results["weights_bytes"] = weights
    results["settings"] = runs
    before = runs[names[0]]
    rows = [
        [
            name,
            r["micro_batch_tokens"],
            "on" if r["gradient_checkpointing"] else "off",
            r["peak_rss_bytes"] / MIB,
            ratio(r["peak_rss_bytes"], weights),
            r["tokens_per_s"],
            ratio(r["tokens_per_s"], before["tokens_per_s"]),
            r["train_loss"],
        ]
        for name, r in runs.items()
    ]
    print(f"\n### Update-stage memory ({args.model}; weights {weights / MIB:.0f} MiB)\n")
    print(
        md_table(
            [
                "setting",
                "micro-batch tokens",
                "checkpointing",
                "peak RSS MiB",
                "× weights",
                "train tokens/s",
                "× first",
                "train loss",
            ],
            rows,
        )
    )
    path = write_json(args.out, results)
    print(f"\nraw: {path}")
    return results


if __name__ == "__main__":
    main()
