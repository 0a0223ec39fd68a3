"""The quality study's results file: ``results.json`` (+ ``results.csv``), shared safely."""

from __future__ import annotations

import csv
import fcntl
import json
import math
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
