"""The `GET /metrics` report: champion, lineage and per-round headline numbers (no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select

from core import metric_names as mn
from core.db.models import Checkpoint, RoundMetric, UpdateRound
from core.db.session import Database

HEADLINE = {
    (mn.EVALUATE, mn.CHAMPION_DEV_PPL),
    (mn.EVALUATE, mn.CANDIDATE_DEV_PPL),
    (mn.EVALUATE, mn.CHAMPION_TEST_PPL),
    (mn.EVALUATE, mn.CANDIDATE_TEST_PPL),
    (mn.EVALUATE, mn.CHAMPION_VALID_PPL),
    (mn.EVALUATE, mn.CANDIDATE_VALID_PPL),
    (mn.EVALUATE, mn.CHAMPION_DISTINCT_2),
    (mn.EVALUATE, mn.CANDIDATE_DISTINCT_2),
    (mn.EVALUATE, mn.CHAMPION_REPETITION_RATE),
    (mn.EVALUATE, mn.CANDIDATE_REPETITION_RATE),
    (mn.META_STEP, mn.EPSILON_CHOSEN),
    (mn.DECIDE, mn.IMPROVEMENT),
    (mn.SELECT, mn.SELECTED),
    (mn.GENERATE, mn.TOKENS_PER_S),
    (mn.UPDATE, mn.TOKENS_PER_S),
    (mn.ROUND, mn.SECONDS),
}
# Stages whose headline names are unique as they are; the others get a ``<stage>_`` prefix.
_UNPREFIXED = (mn.EVALUATE, mn.META_STEP, mn.DECIDE)


def headline(metrics: list[RoundMetric]) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in metrics:
        if m.step is None and (m.stage, m.name) in HEADLINE:
            key = m.name if m.stage in _UNPREFIXED else f"{m.stage}_{m.name}"
            out[key] = m.value
    return out


def checkpoint_bytes(path: str, manifest: dict[str, Any]) -> int | None:
    """Bytes of the files the manifest lists; None when they are not on this host."""
    try:
        return sum(int((Path(path) / name).stat().st_size) for name in manifest.get("files", {}))
    except OSError:
        return None


def build_report(db: Database, lineage: str, limit: int = 100) -> dict[str, Any]:
    with db.session() as s:
        rounds = list(
            s.scalars(
                select(UpdateRound)
                .where(UpdateRound.lineage == lineage)
                .order_by(UpdateRound.id.desc())
                .limit(limit)
            )
        )
        ids = [r.id for r in rounds]
        metrics: dict[int, list[RoundMetric]] = {i: [] for i in ids}
        if ids:
            for m in s.scalars(select(RoundMetric).where(RoundMetric.round_id.in_(ids))):
                metrics[m.round_id].append(m)
        ckpts = list(
            s.scalars(
                select(Checkpoint).where(Checkpoint.lineage == lineage).order_by(Checkpoint.version)
            )
        )
    per_round = {r.id: headline(metrics[r.id]) for r in rounds}
    by_version: dict[int, dict[str, float]] = {}
    for r in rounds:
        h = per_round[r.id]
        if r.decision == "promoted" and r.candidate_version is not None:
            by_version[r.candidate_version] = {
                k.removeprefix("candidate_"): v for k, v in h.items() if k.startswith("candidate_")
            }
        if r.base_version is not None and r.base_version not in by_version:
            by_version[r.base_version] = {
                k.removeprefix("champion_"): v for k, v in h.items() if k.startswith("champion_")
            }
    champion = next((c.version for c in ckpts if c.status == "champion"), None)
    return {
        "lineage": lineage,
        "champion_version": champion,
        "checkpoints": [
            {
                "version": c.version,
                "parent_version": c.parent_version,
                "status": c.status,
                "path": c.path,
                "size_bytes": checkpoint_bytes(c.path, c.manifest),
                "produced_by_round": c.produced_by_round,
                "created_at": c.created_at.isoformat(),
                "promoted_at": c.promoted_at.isoformat() if c.promoted_at else None,
                "metrics": by_version.get(c.version, {}),
            }
            for c in ckpts
        ],
        "rounds": [
            {
                "id": r.id,
                "status": r.status,
                "decision": r.decision,
                "base_version": r.base_version,
                "candidate_version": r.candidate_version,
                "created_at": r.created_at.isoformat(),
                "finished_at": r.finished_at.isoformat() if r.finished_at else None,
                "metrics": per_round[r.id],
            }
            for r in rounds
        ],
    }
