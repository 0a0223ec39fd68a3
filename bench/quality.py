"""The self-update quality study (issue 6): do rounds make the model better, not just different?

For each *arm* (a set of :class:`~selflm.rounds.params.RoundParams` overrides) the study builds
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
report (``bench.quality_report``) is written.

    .venv/bin/python -m bench.quality --rounds 8 --arms reference,selflm
    .venv/bin/python -m bench.quality --small --rounds 2 --base-model tiny:llama  # smoke
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import logging
import math
import os
import platform
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.quality")

LINEAGE = "default"
DEFAULT_UNRELATED = "/usr/share/common-licenses"
PROMPT_SEED = 4242  # the fixed diversity prompt set, the same for every arm and round
RESULTS_VERSION = 1

# Arms: RoundParams overrides on top of the current defaults (so `selflm` is "the defaults").
ARMS: dict[str, dict[str, Any]] = {
    # The reference article's loop: random selection, no filters, no replay, no meta-step,
    # promote when perplexity on the round's own generated valid split improves at all; the
    # article's learning rate and epochs. Its per-sample batch-1 training is replaced by our
    # batched trainer (same optimiser family, far less wall time).
    "reference": {
        "strategy": "random",
        "filters": False,
        "replay_fraction": 0.0,
        "meta_step": False,
        "gate": "generated",
        "promotion_margin": 0.0,
        "learning_rate": 1e-4,
        "epochs": 5,
    },
    "selflm": {},
    "no_replay": {"replay_fraction": 0.0},
    "no_filters": {"filters": False},
    "no_meta_step": {"meta_step": False},
    "random": {"strategy": "random"},
    "diversity": {"strategy": "diversity"},
    "difficulty": {"strategy": "difficulty"},
}
DEFAULT_ARMS = (
    "reference",
    "selflm",
    "no_replay",
    "no_filters",
    "no_meta_step",
    "random",
    "difficulty",
)

# --small: every round shrunk to seconds on tiny:llama (smoke runs; numbers mean nothing).
SMALL_ROUND: dict[str, Any] = {
    "num_prompts": 3,
    "samples_per_prompt": 2,
    "max_new_tokens": 12,
    "min_words": 3,
    "train_size": 4,
    "valid_size": 2,
    "eval_passages": 3,
    "diversity_prompts": 2,
    "epsilon_grid": [0.5, 1.0],
    "batch_size": 4,
    "max_length": 48,
}


@dataclass(frozen=True)
class MeasureConfig:
    """How the study measures a champion; identical for every arm and round."""

    test_passages: int  # 0: every passage of the test split
    unrelated_passages: int  # 0: every passage of the unrelated corpus
    diversity_prompts: int
    max_new_tokens: int
    temperature: float = 0.8
    top_p: float = 0.95
    batch_size: int = 8
    max_length: int = 256
    seed: int = 7


FULL_MEASURE = MeasureConfig(
    test_passages=0, unrelated_passages=96, diversity_prompts=32, max_new_tokens=48
)
SMALL_MEASURE = MeasureConfig(
    test_passages=4,
    unrelated_passages=4,
    diversity_prompts=3,
    max_new_tokens=8,
    batch_size=4,
    max_length=64,
)

CSV_COLUMNS = (
    "arm",
    "round",
    "seed",
    "status",
    "decision",
    "promoted",
    "champion_version",
    "epsilon",
    "champion_dev_ppl",
    "candidate_dev_ppl",
    "champion_valid_ppl",
    "candidate_valid_ppl",
    "improvement",
    "test_ppl",
    "test_tokens",
    "unrelated_ppl",
    "unrelated_tokens",
    "distinct_1",
    "distinct_2",
    "repetition_rate",
    "round_seconds",
    "measure_seconds",
    "reason",
    "error",
)


# --------------------------------------------------------------------------- evaluation sets


@dataclass(frozen=True)
class EvalSets:
    test: list[str]
    unrelated: list[str]
    prompts: list[str]
    info: dict[str, Any]


def load_unrelated_documents(source: str) -> tuple[str, list[str]]:
    """A directory: every regular, non-hidden file below it is one document (symlinks and
    identical copies counted once; files with NUL bytes skipped). A file: read as a corpus
    file (``.jsonl``, or documents separated by form feeds / two blank lines)."""
    from selflm.rounds.data import load_documents

    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(
            f"unrelated corpus {source!r} does not exist; pass --unrelated PATH "
            "(a directory of text files, a .jsonl file or a plain text file)"
        )
    if path.is_file():
        return load_documents(str(path))
    seen: set[Path] = set()
    docs: list[str] = []
    for p in sorted(path.rglob("*"), key=lambda q: q.relative_to(path).as_posix()):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(path).parts):
            continue
        real = p.resolve()
        if real in seen:
            continue
        seen.add(real)
        raw = p.read_bytes()
        if b"\x00" in raw:
            continue
        text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n").strip()
        if text:
            docs.append(text)
    docs = list(dict.fromkeys(docs))
    if not docs:
        raise ValueError(f"unrelated corpus {source!r} holds no text files")
    return path.name, docs


def _take(texts: list[str], n: int, seed: int) -> list[str]:
    """All texts (n == 0) in order, or a seeded sample of n spread over the whole corpus."""
    if n <= 0 or n >= len(texts):
        return list(texts)
    picked = sorted(random.Random(seed).sample(range(len(texts)), n))
    return [texts[i] for i in picked]


def build_eval_sets(domain: str | None, unrelated: str, cfg: MeasureConfig) -> EvalSets:
    from selflm.rounds.data import SPLIT_SEED, load_corpus, passages, prompts_from

    corpus = load_corpus(domain, seed=SPLIT_SEED)
    test_all = passages(corpus.test)
    test = _take(test_all, cfg.test_passages, SPLIT_SEED)
    u_name, u_docs = load_unrelated_documents(unrelated)
    u_all = passages(u_docs)
    unrel = _take(u_all, cfg.unrelated_passages, SPLIT_SEED)
    prompts = prompts_from(corpus.train, cfg.diversity_prompts, random.Random(PROMPT_SEED))
    if not test:
        raise ValueError(f"domain corpus {corpus.name!r} has no test split (too few documents)")
    info = {
        "domain_name": corpus.name,
        "split_seed": SPLIT_SEED,
        "domain_docs": {
            "train": len(corpus.train),
            "dev": len(corpus.dev),
            "test": len(corpus.test),
        },
        "test_passages": len(test),
        "test_passages_total": len(test_all),
        "unrelated_name": u_name,
        "unrelated_docs": len(u_docs),
        "unrelated_passages": len(unrel),
        "unrelated_passages_total": len(u_all),
        "diversity_prompts": len(prompts),
        "prompt_seed": PROMPT_SEED,
    }
    return EvalSets(test=test, unrelated=unrel, prompts=prompts, info=info)


def measure(path: Path, device_name: str, sets: EvalSets, cfg: MeasureConfig) -> dict[str, Any]:
    import torch

    from selflm.modeling.device import pick_device
    from selflm.modeling.loader import load_checkpoint
    from selflm.rounds.evaluate import perplexity
    from selflm.rounds.generate import generate_samples
    from selflm.rounds.textstats import diversity

    started = time.perf_counter()
    loaded = load_checkpoint(path, pick_device(device_name), torch.float32)
    model, tok = loaded.model, loaded.tokenizer
    test = perplexity(model, tok, sets.test, cfg.batch_size, cfg.max_length)
    unrel = perplexity(model, tok, sets.unrelated, cfg.batch_size, cfg.max_length)
    gen = generate_samples(
        model,
        tok,
        sets.prompts,
        1,
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.top_p,
        cfg.seed,
        16,
    )
    div = diversity([s.text for s in gen.samples])
    del model, loaded
    return {
        "test_ppl": test.ppl,
        "test_tokens": test.tokens,
        "unrelated_ppl": unrel.ppl,
        "unrelated_tokens": unrel.tokens,
        "distinct_1": div.distinct_1,
        "distinct_2": div.distinct_2,
        "repetition_rate": div.repetition_rate,
        "diversity_tokens": gen.tokens,
        "measure_seconds": time.perf_counter() - started,
    }


MEASURE_FIELDS = (
    "test_ppl",
    "test_tokens",
    "unrelated_ppl",
    "unrelated_tokens",
    "distinct_1",
    "distinct_2",
    "repetition_rate",
    "diversity_tokens",
    "measure_seconds",
)


# --------------------------------------------------------------------------- results file


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


class Results:
    """``{"meta": {...}, "records": [...]}`` kept in memory and rewritten after each record.

    Several study processes may share one results directory, each running its own arms (on a
    multi-core machine, one process per core pair): a save holds a lock, re-reads the file and
    keeps the other processes' arms as they are on disk.
    """

    def __init__(self, out: Path, data: dict[str, Any]) -> None:
        self.out = out
        self.data = data
        self.owned: set[str] = set()  # the arms this process runs; others come from disk

    @property
    def json_path(self) -> Path:
        return self.out / "results.json"

    @property
    def csv_path(self) -> Path:
        return self.out / "results.csv"

    @classmethod
    def open(cls, out: Path) -> Results:
        path = out / "results.json"
        if path.exists():
            data = json.loads(path.read_text())
            data.setdefault("records", [])
            data.setdefault("meta", {})
        else:
            data = {"meta": {}, "records": []}
        return cls(out, data)

    @property
    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = self.data["meta"]
        return meta

    @property
    def records(self) -> list[dict[str, Any]]:
        recs: list[dict[str, Any]] = self.data["records"]
        return recs

    def get(self, arm: str, round_idx: int) -> dict[str, Any] | None:
        return next((r for r in self.records if r["arm"] == arm and r["round"] == round_idx), None)

    def drop_arm(self, arm: str) -> None:
        self.data["records"] = [r for r in self.records if r["arm"] != arm]

    def add(self, record: dict[str, Any]) -> None:
        self.data["records"] = [
            r for r in self.records if (r["arm"], r["round"]) != (record["arm"], record["round"])
        ]
        self.records.append(record)
        self.save()

    def _merge_from_disk(self) -> None:
        if not self.json_path.exists():
            return
        disk = json.loads(self.json_path.read_text())
        theirs = [r for r in disk.get("records", []) if r["arm"] not in self.owned]
        mine = [r for r in self.records if r["arm"] in self.owned]
        self.data["records"] = theirs + mine
        dmeta = disk.get("meta", {})
        order = [*dmeta.get("arm_order", []), *self.meta.get("arm_order", [])]
        arms = {
            **{k: v for k, v in dmeta.get("arms", {}).items() if k not in self.owned},
            **{k: v for k, v in self.meta.get("arms", {}).items() if k in self.owned},
        }
        self.meta["arm_order"] = list(dict.fromkeys(order))
        self.meta["arms"] = arms
        self.meta["rounds"] = max(int(dmeta.get("rounds", 0) or 0), int(self.meta.get("rounds", 0)))

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with (self.out / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._merge_from_disk()
            self._write()

    def _write(self) -> None:
        arm_order = {a: i for i, a in enumerate(self.meta.get("arm_order", []))}
        self.records.sort(
            key=lambda r: (arm_order.get(r["arm"], len(arm_order)), r["arm"], r["round"])
        )
        self.meta["updated_at"] = datetime.now(UTC).isoformat()
        _atomic_write(self.json_path, json.dumps(_json_safe(self.data), indent=2) + "\n")
        rows = []
        for r in self.records:
            rows.append({c: r.get(c) for c in CSV_COLUMNS})
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        _atomic_write(self.csv_path, buf.getvalue())


# --------------------------------------------------------------------------- arms and params


def parse_sets(items: Sequence[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``KEY=VALUE`` (every arm; the arm's own overrides win) or ``ARM:KEY=VALUE`` (one arm,
    wins over everything). VALUE is JSON when it parses as JSON, else a string."""
    from selflm.rounds.params import RoundParams

    common: dict[str, Any] = {}
    per_arm: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE or ARM:KEY=VALUE")
        key, raw = item.split("=", 1)
        arm = None
        if ":" in key:
            arm, key = key.split(":", 1)
            if arm not in ARMS:
                raise ValueError(f"--set {item!r}: unknown arm {arm!r}")
        if key not in RoundParams.model_fields or key in ("seed", "corpus"):
            raise ValueError(f"--set {item!r}: {key!r} is not a settable round parameter")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        (per_arm.setdefault(arm, {}) if arm else common)[key] = value
    return common, per_arm


def arm_params(
    arm: str,
    seed: int,
    domain: str | None,
    small: bool,
    common: dict[str, Any],
    per_arm: dict[str, dict[str, Any]],
) -> Any:
    """Defaults < --set KEY=V < --small sizes < the arm's overrides < --set ARM:KEY=V."""
    from selflm.rounds.params import RoundParams

    values: dict[str, Any] = {**common}
    if small:
        values.update(SMALL_ROUND)
    values.update(ARMS[arm])
    values.update(per_arm.get(arm, {}))
    values["seed"] = seed
    values["corpus"] = domain
    return RoundParams(**values)


# --------------------------------------------------------------------------- stores


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def _settings(root: Path, base_model: str, device: str) -> Any:
    from selflm.settings import Settings

    values: dict[str, Any] = {
        "database_url": f"sqlite:///{root / 'selflm.db'}",
        "checkpoint_dir": str(root / "checkpoints"),
        "base_model": base_model,
        "lineage": LINEAGE,
        "device": device,  # validated: auto | cpu | cuda
        "redis_url": None,
        "embedded_worker": False,
    }
    return Settings(**values)


def prepare_base(root: Path, base_model: str, device: str) -> Path:
    """Import the base model once (the GGUF dequantisation is slow); arms copy its v1."""
    from selflm.checkpoints import ensure_base_checkpoint
    from selflm.db.session import Database, upgrade

    settings = _settings(root, base_model, device)
    upgrade(settings.database_url)
    db = Database(settings.database_url)
    try:
        row = ensure_base_checkpoint(settings, db)
        return Path(row.path)
    finally:
        db.dispose()


def open_arm_store(
    root: Path, base_dir: Path, base_model: str, device: str, fresh: bool
) -> tuple[Any, Any]:
    from selflm.checkpoints import ensure_base_checkpoint
    from selflm.db.session import Database, upgrade
    from selflm.modeling.store import checkpoint_path

    if fresh and root.exists():
        shutil.rmtree(root)
    settings = _settings(root, base_model, device)
    v1 = checkpoint_path(settings.checkpoint_dir, LINEAGE, 1)
    if not v1.exists():
        v1.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(base_dir, v1)
    upgrade(settings.database_url)
    db = Database(settings.database_url)
    ensure_base_checkpoint(settings, db)  # reuses the copied directory: verify + record
    return settings, db


def finished_rounds(db: Any) -> list[Any]:
    """The store's finished rounds in order; rounds an interrupted run left open are closed
    first (as promoted when their promotion had committed, else cancelled)."""
    from selflm.rounds import records

    rows, _ = records.list_rounds(db, LINEAGE, limit=100000, offset=0)
    rows.reverse()
    for row in rows:
        if row.status in records.ACTIVE:
            if row.candidate_version is not None:
                log.warning("round %d: interrupted after its promotion; keeping it", row.id)
                records.finish(db, row.id, "succeeded", decision="promoted", stage="done")
            else:
                log.warning("round %d: interrupted; cancelling it and running it again", row.id)
                records.finish(db, row.id, "cancelled", error="quality study interrupted")
    rows, _ = records.list_rounds(db, LINEAGE, limit=100000, offset=0)
    rows.reverse()
    return [r for r in rows if r.status in ("succeeded", "failed")]


def champion_after(db: Any, rows: Sequence[Any]) -> tuple[int, Path, dict[str, Any]]:
    """The champion once ``rows`` (finished rounds, in order) have run: the last promoted
    candidate, else v1. Derived from the rounds, not the live pointer, so a resumed run
    measures round i's champion even if later rounds already ran."""
    from selflm.checkpoints import get_checkpoint

    version = 1
    for row in rows:
        if row.decision == "promoted" and row.candidate_version is not None:
            version = row.candidate_version
    with db.session() as s:
        c = get_checkpoint(s, LINEAGE, version)
        if c is None:
            raise RuntimeError(f"checkpoint v{version} is missing from the arm's store")
        return c.version, Path(c.path), dict(c.manifest)


def round_summary(row: Any) -> dict[str, Any]:
    """The round's own numbers (dev gate, ε, selection, timings) from its metrics."""
    from selflm.rounds import records

    flat: dict[str, float] = {}
    for stage, values in records.metrics_dict(row).items():
        for name, value in values.items():
            if not isinstance(value, list):
                flat[f"{stage}.{name}"] = value
    ev = {k.removeprefix("evaluate."): v for k, v in flat.items() if k.startswith("evaluate.")}
    return {
        "round_id": row.id,
        "status": row.status,
        "decision": row.decision,
        "promoted": row.decision == "promoted",
        "reason": row.reason,
        "error": row.error,
        "epsilon": flat.get("meta_step.epsilon_chosen"),
        "champion_dev_ppl": ev.get("champion_dev_ppl"),
        "candidate_dev_ppl": ev.get("candidate_dev_ppl"),
        "champion_valid_ppl": ev.get("champion_valid_ppl"),
        "candidate_valid_ppl": ev.get("candidate_valid_ppl"),
        "round_test_ppl_champion": ev.get("champion_test_ppl"),
        "round_test_ppl_candidate": ev.get("candidate_test_ppl"),
        "improvement": flat.get("decide.improvement"),
        "round_seconds": flat.get("round.seconds"),
        "round_metrics": flat,
    }


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

    def measured(self, path: Path, manifest: dict[str, Any]) -> tuple[str, dict[str, Any], bool]:
        from selflm.rounds.diversity_gate import weights_key

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

    def run_arm(self, arm: str, base_dir: Path, work: Path) -> None:
        from selflm.modeling.store import read_manifest
        from selflm.rounds import records
        from selflm.rounds.pipeline import run_round

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
                if i <= len(rows):
                    row = rows[i - 1]  # ran before the cut, not yet measured
                    log.info("%s round %d: ran before the interruption; measuring it", arm, i)
                else:
                    params = arm_params(arm, seed, a.domain, a.small, self.common, self.per_arm)
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
                self.record(arm, i, champion_after(db, rows[:i]), summary)
        finally:
            db.dispose()


def _comparable(meta: dict[str, Any]) -> dict[str, Any]:
    keys = ("base_model", "domain", "unrelated", "small", "seed", "measure", "results_version")
    return {k: meta.get(k) for k in keys}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.quality",
        description="Self-update quality study: N rounds per arm from the same base.",
    )
    p.add_argument("--rounds", type=int, default=8, help="rounds per arm (default 8)")
    p.add_argument(
        "--arms",
        default=",".join(DEFAULT_ARMS),
        help=f"comma-separated arms, or 'all' (known: {', '.join(ARMS)})",
    )
    p.add_argument("--base-model", default="bundled:smollm2-135m-instruct")
    p.add_argument("--domain", default=None, help="domain corpus (default: pydoc topics)")
    p.add_argument(
        "--unrelated",
        default=DEFAULT_UNRELATED,
        help=f"unrelated real corpus: directory, .jsonl or text file (default {DEFAULT_UNRELATED})",
    )
    p.add_argument("--out", type=Path, default=Path("docs/quality"), help="results directory")
    p.add_argument("--work", type=Path, default=Path("data/quality"), help="stores per arm")
    p.add_argument("--report", type=Path, default=Path("docs/quality.md"), help="report path")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--seed", type=int, default=0, help="round i uses seed SEED + i (every arm)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--small", action="store_true", help="tiny rounds and measurements (smoke)")
    p.add_argument("--resume", action="store_true", help="skip (arm, round) pairs already done")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="[ARM:]KEY=VALUE",
        help="round-parameter override for every arm (the arm's own win) or for one arm",
    )
    p.add_argument("--test-passages", type=int, default=None, help="0 = whole test split")
    p.add_argument("--unrelated-passages", type=int, default=None, help="0 = whole corpus")
    p.add_argument("--diversity-prompts", type=int, default=None)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


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
    if args.domain is not None and args.domain != "pydoc":
        args.domain = str(Path(args.domain).expanduser().resolve())
    common, per_arm = parse_sets(args.sets)
    base_cfg = SMALL_MEASURE if args.small else FULL_MEASURE
    overrides = {
        "test_passages": args.test_passages,
        "unrelated_passages": args.unrelated_passages,
        "diversity_prompts": args.diversity_prompts,
    }
    cfg = MeasureConfig(
        **{**asdict(base_cfg), **{k: v for k, v in overrides.items() if v is not None}}
    )
    # Validate every arm's parameters before spending minutes on the base import.
    for arm in arms:
        arm_params(arm, args.seed + 1, args.domain, args.small, common, per_arm)

    sets = build_eval_sets(args.domain, args.unrelated, cfg)
    results = Results.open(args.out)
    meta_now = {
        "results_version": RESULTS_VERSION,
        "base_model": args.base_model,
        "domain": args.domain,
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
        work = args.work / (_slug(args.base_model) + ("-small" if args.small else ""))
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
        from bench.quality_report import write_report

        write_report(results.json_path, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
