"""Round rows: create, claim, progress, metrics, finish. No torch here (routes use it).

The round row is the source of truth. A task claims it with a guarded update, so a
redelivered message either resumes a round whose worker died or does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import timedelta
from typing import Any

from sqlalchemy import Update, func, select, update
from sqlalchemy.exc import IntegrityError

from core.db.models import RoundMetric, ServedPrompt, UpdateRound, utcnow
from core.db.session import Database

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")


class RoundConflictError(RuntimeError):
    def __init__(self, active_id: int) -> None:
        super().__init__(f"round {active_id} is already queued or running for this lineage")
        self.active_id = active_id


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def active_round(db: Database, lineage: str) -> UpdateRound | None:
    with db.session() as s:
        return s.scalars(
            select(UpdateRound).where(
                UpdateRound.lineage == lineage, UpdateRound.status.in_(ACTIVE)
            )
        ).first()


def expire_stale(db: Database, lineage: str, stale_after_s: float) -> int:
    """Fail running rounds whose heartbeat stopped (their worker is gone)."""
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    with db.session() as s:
        res = s.execute(
            update(UpdateRound)
            .where(
                UpdateRound.lineage == lineage,
                UpdateRound.status == "running",
                UpdateRound.heartbeat_at < cutoff,
            )
            .values(status="failed", error="worker lost (no heartbeat)", finished_at=utcnow())
        )
        return int(res.rowcount or 0)  # type: ignore[attr-defined]


def create_round(db: Database, lineage: str, params: dict[str, Any]) -> UpdateRound:
    """Insert a queued round; RoundConflictError when one is queued or running."""
    try:
        with db.session() as s:
            row = UpdateRound(lineage=lineage, status="queued", params=params, progress=0.0)
            s.add(row)
            s.flush()
            return row
    except IntegrityError:
        active = active_round(db, lineage)
        if active is None:
            raise
        raise RoundConflictError(active.id) from None


def get_round(db: Database, round_id: int) -> UpdateRound | None:
    with db.session() as s:
        row = s.get(UpdateRound, round_id)
        if row is not None:
            _ = row.metrics  # load while the session is open
        return row


def list_rounds(
    db: Database, lineage: str, limit: int, offset: int
) -> tuple[list[UpdateRound], int]:
    with db.session() as s:
        total = s.scalar(
            select(func.count()).select_from(UpdateRound).where(UpdateRound.lineage == lineage)
        )
        rows = list(
            s.scalars(
                select(UpdateRound)
                .where(UpdateRound.lineage == lineage)
                .order_by(UpdateRound.id.desc())
                .limit(limit)
                .offset(offset)
            )
        )
        for r in rows:
            _ = r.metrics
        return rows, int(total or 0)


def claim(db: Database, round_id: int, stale_after_s: float) -> bool:
    """queued → running (or take over a running round whose heartbeat is stale)."""
    now = utcnow()
    cutoff = now - timedelta(seconds=stale_after_s)
    values = dict(
        status="running",
        started_at=now,
        heartbeat_at=now,
        worker_id=worker_id(),
        attempts=UpdateRound.attempts + 1,
        stage="starting",
        progress=0.0,
    )
    with db.session() as s:
        res = s.execute(
            update(UpdateRound)
            .where(UpdateRound.id == round_id, UpdateRound.status == "queued")
            .values(**values)
        )
        if res.rowcount:  # type: ignore[attr-defined]
            return True
        res = s.execute(
            update(UpdateRound)
            .where(
                UpdateRound.id == round_id,
                UpdateRound.status == "running",
                UpdateRound.heartbeat_at < cutoff,
            )
            .values(**values)
        )
        if res.rowcount:  # type: ignore[attr-defined]
            # A redelivery after the first worker died: start the round over, cleanly.
            s.query(RoundMetric).filter(RoundMetric.round_id == round_id).delete()
            log.warning("round %d: taking over from a worker that stopped", round_id)
            return True
    return False


def set_progress(db: Database, round_id: int, stage: str, progress: float) -> None:
    with db.session() as s:
        s.execute(
            update(UpdateRound)
            .where(UpdateRound.id == round_id)
            .values(stage=stage, progress=max(0.0, min(1.0, progress)), heartbeat_at=utcnow())
        )


def heartbeat(db: Database, round_id: int) -> None:
    with db.session() as s:
        s.execute(
            update(UpdateRound)
            .where(UpdateRound.id == round_id, UpdateRound.status == "running")
            .values(heartbeat_at=utcnow())
        )


def update_stmt(round_id: int, **values: Any) -> Update:
    return update(UpdateRound).where(UpdateRound.id == round_id).values(**values)


def update_round(db: Database, round_id: int, **values: Any) -> None:
    with db.session() as s:
        s.execute(update_stmt(round_id, **values))


def add_metrics(
    db: Database, round_id: int, stage: str, values: dict[str, float], step: int | None = None
) -> None:
    with db.session() as s:
        s.add_all(
            RoundMetric(round_id=round_id, stage=stage, name=k, value=float(v), step=step)
            for k, v in values.items()
        )


def finish(db: Database, round_id: int, status: str, **values: Any) -> None:
    update_round(db, round_id, status=status, finished_at=utcnow(), heartbeat_at=utcnow(), **values)


def cancel(db: Database, round_id: int) -> bool:
    """Cancel a queued round (a running one stops at its next stage boundary)."""
    with db.session() as s:
        res = s.execute(
            update(UpdateRound)
            .where(UpdateRound.id == round_id, UpdateRound.status.in_(ACTIVE))
            .values(status="cancelled", finished_at=utcnow())
        )
        return bool(res.rowcount)  # type: ignore[attr-defined]


def is_cancelled(db: Database, round_id: int) -> bool:
    with db.session() as s:
        return s.scalar(select(UpdateRound.status).where(UpdateRound.id == round_id)) == "cancelled"


def metrics_dict(row: UpdateRound) -> dict[str, dict[str, Any]]:
    """Metrics grouped by stage; a metric with steps becomes a list ordered by step."""
    out: dict[str, dict[str, Any]] = {}
    for m in row.metrics:
        stage = out.setdefault(m.stage, {})
        if m.step is None:
            stage[m.name] = m.value
        else:
            stage.setdefault(m.name, []).append({"step": m.step, "value": m.value})
    return out


class RoundCancelled(RuntimeError):
    pass


class Heartbeat:
    """Keeps `heartbeat_at` fresh while a long stage runs, from a side thread."""

    def __init__(self, db: Database, round_id: int, every_s: float = 10.0) -> None:
        self._db, self._id, self._every = db, round_id, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="round-heartbeat")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                heartbeat(self._db, self._id)
            except Exception:
                log.warning("heartbeat failed", exc_info=True)


def served_prompts(db: Database, lineage: str, limit: int) -> list[str]:
    """The lineage's most recently served prompts (recorded with SELFLM_RECORD_PROMPTS)."""
    with db.session() as s:
        return list(
            s.scalars(
                select(ServedPrompt.prompt)
                .where(ServedPrompt.lineage == lineage)
                .order_by(ServedPrompt.id.desc())
                .limit(limit)
            )
        )


# ------------------------------------------------------------------ progress inside a stage


def enter_stage(db: Database, round_id: int, stage: str, progress: float) -> None:
    """A stage begins: its name, its own progress back to 0, the overall bar where it starts."""
    with db.session() as s:
        s.execute(
            update(UpdateRound)
            .where(UpdateRound.id == round_id)
            .values(
                stage=stage,
                stage_progress=0.0,
                progress=max(0.0, min(1.0, progress)),
                progress_detail=None,
                heartbeat_at=utcnow(),
            )
        )


def write_progress(
    db: Database,
    round_id: int,
    stage_progress: float,
    progress: float,
    detail: dict[str, Any] | None,
) -> None:
    """Progress inside the current stage (the worker calls this at a bounded rate)."""
    with db.session() as s:
        s.execute(
            update(UpdateRound)
            .where(UpdateRound.id == round_id)
            .values(
                stage_progress=max(0.0, min(1.0, stage_progress)),
                progress=max(0.0, min(1.0, progress)),
                progress_detail=detail,
                heartbeat_at=utcnow(),
            )
        )
