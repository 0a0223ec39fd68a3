"""Worker memory benchmark: peak RSS of one whole round, per stage, against the weights' size.

Runs a round (default parameters unless ``--params`` says otherwise) on a fresh scratch
database whose v1 champion is the base checkpoint (hard-linked from ``--checkpoint-dir`` so
the reused store is never written to, and the diversity cache starts cold as on a lineage's
first round), in a child process that runs exactly what a Celery worker runs for a round
(:func:`worker.rounds.pipeline.run_round`). Two views of its memory:

* the round's own ``peak_rss_bytes`` metric per stage (the kernel's peak counter, reset at each
  stage's start, so spikes between samples count), read back from the database;
* the child's VmRSS sampled from here every ``--interval`` seconds (a cross-check).

Also the round's wall seconds per stage and the child's CPU seconds (user + system).

    .venv/bin/python -m bench.round_memory --checkpoint-dir data/bench-ck
    .venv/bin/python -m bench.memory --worker-round --checkpoint-dir data/bench-ck  # the same
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.report import default_out, md_table, ratio, run_info, setup_logging, write_json
from bench.rss import RssSampler
from bench.state import DEFAULT_MODEL, workdir_for

log = logging.getLogger("bench.round_memory")

TARGET = 6.0  # × weights, the bound for a default round
MIB = 1024 * 1024


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench.round_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="base model (SELFLM_BASE_MODEL form)")
    ap.add_argument(
        "--checkpoint-dir", help="store holding (or to receive) the base checkpoint, reused"
    )
    ap.add_argument("--workdir", help="keep the scratch database and store here")
    ap.add_argument("--params", default="{}", help="round parameters as JSON (default: none)")
    ap.add_argument("--interval", type=float, default=0.05, help="RSS sampling interval (s)")
    ap.add_argument("--out", default=default_out("round_memory"))
    return ap.parse_args(argv)


def _scratch_store(model: str, reused: str | None, workdir: Path) -> Path:
    """``workdir/checkpoints`` with v1 hard-linked from the reused store when it has one."""
    from core.settings import Settings
    from core.store import checkpoint_path

    store = workdir / "checkpoints"
    if store.exists():
        import shutil

        shutil.rmtree(store)
    if reused:
        from bench.state import prepare_state

        lineage = Settings(redis_url=None).lineage
        src = checkpoint_path(Path(reused).expanduser().resolve(), lineage, 1)
        if not src.exists():  # import the base into the reused store once
            prepare_state(model, reused, workdir / "import").db.dispose()
        dst = checkpoint_path(store, lineage, 1)
        dst.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file():
                os.link(f, dst / f.name)
    return store


def _child_cmd(db_url: str, store: Path, model: str, round_id: int) -> list[str]:
    code = (
        "import sys, json; from bench.round_memory import child; "
        "child(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))"
    )
    return [sys.executable, "-c", code, db_url, str(store), model, str(round_id)]


def child(db_url: str, store: str, model: str, round_id: int) -> None:
    """The worker side: what a Celery task runs for one round."""
    setup_logging()
    from core.db.session import Database
    from core.settings import Settings
    from worker.rounds.pipeline import run_round

    settings = Settings(
        database_url=db_url,
        checkpoint_dir=store,
        base_model=model,
        embedded_worker=False,
        redis_url=None,
        api_keys="",
    )
    db = Database(db_url)
    try:
        outcome = run_round(settings, db, round_id)
        log.info("round %d: %s", round_id, outcome)
    finally:
        db.dispose()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_logging()
    from core.db import rounds as records
    from core.round_params import RoundParams
    from core.store import weights_bytes

    params = RoundParams.model_validate(json.loads(args.params)).model_dump(mode="json")
    results: dict[str, Any] = {
        "bench": "round_memory",
        "model": args.model,
        "params": json.loads(args.params),
        "run": run_info(argv),
    }
    with workdir_for(args.workdir, "selflm-bench-round-memory-") as workdir:
        from bench.state import prepare_state

        store = _scratch_store(args.model, args.checkpoint_dir, workdir)
        state = prepare_state(args.model, str(store), workdir)
        weights = weights_bytes(state.base_path)
        row = records.create_round(state.db, state.settings.lineage, params)
        cmd = _child_cmd(state.settings.database_url, store, args.model, row.id)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1])
        with RssSampler(proc.pid, args.interval) as sampler:
            rc = proc.wait()
        wall = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if rc != 0:
            raise SystemExit(f"the round's process exited with {rc}")
        done = records.get_round(state.db, row.id)
        assert done is not None
        metrics = records.metrics_dict(done)
        results["decision"] = done.decision
        results["reason"] = done.reason
        state.db.dispose()
    from core import metric_names as mn

    results["weights_bytes"] = weights
    results["process_wall_s"] = wall
    results["process_cpu_s"] = (after.ru_utime - before.ru_utime) + (
        after.ru_stime - before.ru_stime
    )
    results["sampled_peak_rss_bytes"] = sampler.peak(started, time.monotonic())
    stages: dict[str, dict[str, float]] = {}
    for name in (mn.DATA, *mn.STAGES, mn.ROUND):
        got = metrics.get(name, {})
        entry: dict[str, float] = {}
        if isinstance(got.get(mn.SECONDS), float):
            entry["seconds"] = got[mn.SECONDS]
        if isinstance(got.get(mn.MEMORY), float):
            entry["peak_rss_bytes"] = got[mn.MEMORY]
            entry["ratio_to_weights"] = ratio(got[mn.MEMORY], weights)
        stages[name] = entry
    results["stages"] = stages
    results["epsilon_chosen"] = metrics.get(mn.META_STEP, {}).get(mn.EPSILON_CHOSEN)
    results["champion_dev_ppl"] = metrics.get(mn.EVALUATE, {}).get(mn.CHAMPION_DEV_PPL)
    results["candidate_dev_ppl"] = metrics.get(mn.EVALUATE, {}).get(mn.CANDIDATE_DEV_PPL)
    round_peak = stages[mn.ROUND].get("peak_rss_bytes", float(results["sampled_peak_rss_bytes"]))
    results["peak_rss_bytes"] = round_peak
    results["ratio_to_weights"] = ratio(round_peak, weights)

    rows: list[list[object]] = [["weights (*.safetensors)", weights / MIB, 1.0, "", ""]]
    for name, entry in stages.items():
        if "peak_rss_bytes" in entry:
            rows.append(
                [
                    "round (whole)" if name == mn.ROUND else name,
                    entry["peak_rss_bytes"] / MIB,
                    entry["ratio_to_weights"],
                    entry.get("seconds", ""),
                    f"≤ {TARGET:g}×" if name == mn.ROUND else "",
                ]
            )
    rows.append(
        [
            "sampled VmRSS peak (cross-check)",
            results["sampled_peak_rss_bytes"] / MIB,
            ratio(results["sampled_peak_rss_bytes"], weights),
            "",
            "",
        ]
    )
    print(
        f"\n### Round memory (worker; {args.model}; {wall:.0f} s wall, "
        f"{results['process_cpu_s']:.0f} s CPU; decision {results['decision']})\n"
    )
    print(md_table(["stage", "peak RSS MiB", "× weights", "seconds", "target"], rows))
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
