"""The self-update quality study (issue 6): do rounds make the model better, not just different?

For each *arm* (a set of :class:`~core.round_params.RoundParams` overrides) the study builds
a fresh store — its own SQLite database and checkpoint directory under ``--work`` — with the
base model as ``v1``, then runs N consecutive rounds through the real pipeline
(``records.create_round`` + ``run_round``). Round ``i`` uses seed ``--seed + i`` in every arm,
so the arms see the same prompt draws and differ only in their round design.

After every round the lineage's *champion* (promoted this round or not) is measured on:

* the domain **test** split (``load_corpus(domain).test`` with the pipeline's split seed): text
  no round ever trains on, draws prompts from, chooses ε on or gates on;
* an **unrelated** real corpus (default: the license texts in ``/usr/share/common-licenses``,
  English legal prose that Debian's ``base-files`` puts in every Debian image, including the
  ``python:3.11-slim`` base of our Dockerfile) — general ability outside the domain;
* **diversity** of its samples (distinct-1/2, trigram repetition rate) on a fixed prompt set
  drawn from the domain *train* split, sampled with a fixed seed.

Round 0 is the base model. A measurement is keyed by the checkpoint's file digests, so a
champion that did not change is not measured twice (the numbers are deterministic).

Results go to ``<out>/results.json`` and ``<out>/results.csv`` after every round, written
atomically, so a run that is cut off keeps what it finished; ``--resume`` skips the (arm,
round) pairs already there and picks each arm's store up where it stopped. At the end the
report (``studies.quality.report``) is written.

    .venv/bin/python -m studies.quality --rounds 8 --arms reference,selflm
    .venv/bin/python -m studies.quality --small --rounds 2 --base-model tiny:llama  # smoke
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from studies.quality import domains, traffic
from studies.quality.arms import ARMS, arm_params, parse_sets
from studies.quality.cli import build_parser
from studies.quality.measure import (
    DEFAULT_UNRELATED,
    FULL_MEASURE,
    MEASURE_FIELDS,
    PROMPT_SEED,
    SMALL_MEASURE,
    EvalSets,
    MeasureConfig,
    build_eval_sets,
    load_unrelated_documents,
    measure,
)
from studies.quality.results import CSV_COLUMNS, Results
from studies.quality.store import (
    LINEAGE,
    champion_after,
    finished_rounds,
    open_arm_store,
    prepare_base,
    round_summary,
    slug,
)

__all__ = [
    "ARMS",
    "CSV_COLUMNS",
    "DEFAULT_UNRELATED",
    "MEASURE_FIELDS",
    "PROMPT_SEED",
    "EvalSets",
    "MeasureConfig",
    "Results",
    "build_eval_sets",
    "load_unrelated_documents",
    "main",
    "measure",
]

log = logging.getLogger("studies.quality")

RESULTS_VERSION = 2  # 2: issue 15 (128-prompt probe, per-domain results)


# --------------------------------------------------------------------------- the study


@dataclass
class Study:
    args: argparse.Namespace
    results: Results
    sets: EvalSets
    measure_cfg: MeasureConfig
    common: dict[str, Any]
    per_arm: dict[str, dict[str, Any]]
    cache: dict[str, dict[str, Any]]
    stream: list[str] | None = None  # the traffic question stream (served arms)

    def measured(self, path: Path, manifest: dict[str, Any]) -> tuple[str, dict[str, Any], bool]:
        from worker.rounds.diversity_gate import weights_key

        key = weights_key(manifest)
        if key in self.cache:
            return key, dict(self.cache[key]), False
        values = measure(path, self.args.device, self.sets, self.measure_cfg)
        self.cache[key] = values
        return key, dict(values), True

    def record(
        self,
        arm: str,
        round_idx: int,
        checkpoint: tuple[int, Path, dict[str, Any]],
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        version, path, manifest = checkpoint
        key, values, fresh = self.measured(path, manifest)
        rec: dict[str, Any] = {
            "arm": arm,
            "round": round_idx,
            "champion_version": version,
            "weights_key": key,
            "measured_fresh": fresh,
            **values,
            **extra,
        }
        self.results.add(rec)
        base = self.results.get(arm, 0)
        delta = ""
        if base and base.get("test_ppl"):
            delta = f" ({(rec['test_ppl'] / base['test_ppl'] - 1) * 100:+.2f}% vs base)"
        log.info(
            "%s round %d: %s v%d; test ppl %.3f%s, unrelated ppl %.3f, distinct-2 %.3f, "
            "repetition %.3f",
            arm,
            round_idx,
            extra.get("decision") or extra.get("status"),
            version,
            rec["test_ppl"],
            delta,
            rec["unrelated_ppl"],
            rec["distinct_2"],
            rec["repetition_rate"],
        )
        return rec

    def serve_traffic(
        self, params: Any, settings: Any, db: Any, root: Path, round_idx: int
    ) -> dict[str, Any]:
        """For an arm whose prompts come from served traffic: replay this round's slice of the
        question stream through a real ``selflm serve`` on the arm's store; else nothing."""
        if params.prompt_source != "served" or params.prompts:
            return {}
        if self.stream is None:
            self.stream = traffic.load_stream(self.args.traffic)
        questions = traffic.slice_for_round(self.stream, round_idx, params.num_prompts)
        got = traffic.replay(
            settings,
            db,
            questions,
            root / "serve.log",
            max_new_tokens=8 if self.args.small else 32,
        )
        return got.summary()

    def run_arm(self, arm: str, base_dir: Path, work: Path) -> None:
        from core.db import rounds as records
        from core.store import read_manifest
        from worker.rounds.pipeline import run_round

        a = self.args
        root = work / arm
        done = {r["round"] for r in self.results.records if r["arm"] == arm}
        fresh = not a.resume or not root.exists()
        if fresh:
            self.results.drop_arm(arm)
            done = set()
        settings, db = open_arm_store(root, base_dir, a.base_model, a.device, fresh)
        try:
            rows = finished_rounds(db)
            beyond = [i for i in done if i > len(rows)]
            if beyond:
                raise RuntimeError(
                    f"{arm}: results.json has rounds {sorted(beyond)} that the store at {root} "
                    "never ran; run without --resume to start this arm over"
                )
            if 0 not in done:
                v1 = (1, base_dir, read_manifest(base_dir))
                self.record(arm, 0, v1, {"status": "base", "seed": None, "promoted": None})
            for i in range(1, a.rounds + 1):
                if i in done:
                    continue
                seed = a.seed + i
                served: dict[str, Any] = {}
                if i <= len(rows):
                    row = rows[i - 1]  # ran before the cut, not yet measured
                    log.info("%s round %d: ran before the interruption; measuring it", arm, i)
                else:
                    params = arm_params(arm, seed, a.domain, a.small, self.common, self.per_arm)
                    served = self.serve_traffic(params, settings, db, root, i)
                    row = records.create_round(db, LINEAGE, params.model_dump(mode="json"))
                    log.info("%s round %d/%d (id %d, seed %d)", arm, i, a.rounds, row.id, seed)
                    started = time.perf_counter()
                    try:
                        run_round(settings, db, row.id)
                    except Exception:
                        log.exception("%s round %d failed; the champion stays", arm, i)
                    except BaseException:
                        records.finish(db, row.id, "cancelled", error="quality study interrupted")
                        raise
                    log.info("%s round %d took %.1fs", arm, i, time.perf_counter() - started)
                    got = records.get_round(db, row.id)
                    assert got is not None
                    row = got
                    rows.append(row)
                summary = round_summary(row)
                summary["seed"] = row.params.get("seed", seed)
                summary.update(served)
                self.record(arm, i, champion_after(db, rows[:i]), summary)
        finally:
            db.dispose()


def _comparable(meta: dict[str, Any]) -> dict[str, Any]:
    keys = ("base_model", "domain", "unrelated", "small", "seed", "measure", "results_version")
    return {k: meta.get(k) for k in keys}


def _raise_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    arms = list(ARMS) if args.arms == "all" else [a.strip() for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise SystemExit(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    domain = domains.resolve(args.domain)
    # Results record a bundled domain by its name, so a results file resumes from any checkout.
    domain_label = domain.key if args.domain in domains.DOMAINS else domain.path
    args.domain = domain.path
    args.out = args.out or domain.out
    args.report = args.report or domain.report
    if args.domain is not None:
        # Rounds read named data only from the round data directory (core/datafiles.py):
        # the study, as the operator, points it at the domain's folder.
        os.environ["SELFLM_ROUND_DATA_DIR"] = str(Path(args.domain).parent)
    common, per_arm = parse_sets(args.sets)
    base_cfg = SMALL_MEASURE if args.small else FULL_MEASURE
    overrides = {
        "test_passages": args.test_passages
        if args.test_passages is not None
        else domain.test_passages,
        "unrelated_passages": args.unrelated_passages,
        "diversity_prompts": args.diversity_prompts,
    }
    cfg = MeasureConfig(
        **{**asdict(base_cfg), **{k: v for k, v in overrides.items() if v is not None}}
    )
    # Validate every arm's parameters before spending minutes on the base import.
    for arm in arms:
        try:
            arm_params(arm, args.seed + 1, args.domain, args.small, common, per_arm)
        except ValueError as e:
            raise SystemExit(f"arm {arm}: {e}") from None

    sets = build_eval_sets(args.domain, args.unrelated, cfg)
    if args.traffic is None and any(
        arm_params(a, 1, args.domain, args.small, common, per_arm).prompt_source == "served"
        for a in arms
    ):
        args.traffic = traffic.stream_for(sets.info["domain_name"])
    results = Results.open(args.out)
    meta_now = {
        "results_version": RESULTS_VERSION,
        "base_model": args.base_model,
        "domain": domain_label,
        "unrelated": str(Path(args.unrelated).expanduser()),
        "small": args.small,
        "seed": args.seed,
        "measure": asdict(cfg),
    }
    if results.records and _comparable(results.meta) != _comparable(meta_now):
        raise SystemExit(
            f"{results.json_path} holds a study with other settings "
            f"({_comparable(results.meta)}); use another --out or remove it"
        )
    results.owned = set(arms)
    if not args.resume:
        for arm in arms:
            results.drop_arm(arm)
    import torch

    results.meta.update(meta_now)
    results.meta.setdefault("started_at", datetime.now(UTC).isoformat())
    results.meta["rounds"] = max(args.rounds, int(results.meta.get("rounds", 0) or 0))
    results.meta["arm_order"] = list(dict.fromkeys([*results.meta.get("arm_order", []), *arms]))
    arm_meta = results.meta.setdefault("arms", {})
    for arm in arms:
        p = arm_params(arm, args.seed, args.domain, args.small, common, per_arm)
        arm_meta[arm] = {
            "overrides": {**ARMS[arm], **per_arm.get(arm, {})},
            "params": p.model_dump(mode="json", exclude={"seed", "corpus"}),
        }
    results.meta["common_overrides"] = common
    results.meta["eval_sets"] = sets.info
    results.meta["environment"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "device": args.device,
    }
    results.save()
    log.info(
        "eval sets: %d test passages, %d unrelated passages (%s), %d diversity prompts",
        len(sets.test),
        len(sets.unrelated),
        sets.info["unrelated_name"],
        len(sets.prompts),
    )

    cache: dict[str, dict[str, Any]] = {}
    for r in results.records:
        if r.get("weights_key") and all(r.get(f) is not None for f in MEASURE_FIELDS):
            cache.setdefault(r["weights_key"], {f: r[f] for f in MEASURE_FIELDS})
    study = Study(args, results, sets, cfg, common, per_arm, cache)

    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        work = args.work / (slug(args.base_model) + ("-small" if args.small else ""))
        started = time.perf_counter()
        base_dir = prepare_base(work / "_base", args.base_model, args.device)
        log.info("base checkpoint ready at %s (%.1fs)", base_dir, time.perf_counter() - started)
        for arm in arms:
            t = time.perf_counter()
            study.run_arm(arm, base_dir, work)
            log.info("arm %s done in %.1fs", arm, time.perf_counter() - t)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not args.no_report:
        from studies.quality.report import write_report

        write_report(results.json_path, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
