"""Round rows: create, claim, progress, metrics, finish. No torch here (routes use it).

The round row is the source of truth. A task claims it with a guarded update, so a
redelivered message either resumes a round whose worker died or does nothing.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import Update, func, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from core.db.liveness import WORKER_STALE_AFTER_S, aware, beat, owner_dead, pid_gone, worker_id
from core.db.models import RoundMetric, ServedPrompt, UpdateRound, utcnow
from core.db.session import Database

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")


class RoundConflictError(RuntimeError):
    def __init__(self, active_id: int) -> None:
        super().__init__(f"round {active_id} is already queued or running for this lineage")
        self.active_id = active_id


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


def claim(
    db: Database,
    round_id: int,
    stale_after_s: float,
    worker_stale_after_s: float = WORKER_STALE_AFTER_S,
) -> bool:
    """queued → running, or take over a running round whose owner is dead.

    Each claim writes a fresh `claim_token`; a takeover is a compare-and-swap on the token it
    saw, so two redeliveries cannot both win. The owner is dead when its process is gone
    (same host) or its *worker* heartbeat is older than `worker_stale_after_s` — a fresh round
    heartbeat does not keep a dead owner's round (the old bug dropped redeliveries for 5
    minutes). `stale_after_s` (the round's own heartbeat) is the fallback for owners that
    never wrote a worker heartbeat.
    """
    beat(db, "round", round_id)  # visible as alive before we own anything
    now = utcnow()
    token = uuid.uuid4().hex
    values = dict(
        status="running",
        started_at=now,
        heartbeat_at=now,
        worker_id=worker_id(),
        attempts=UpdateRound.attempts + 1,
        stage="starting",
        progress=0.0,
        claim_token=token,
    )
    with db.session() as s:
        res = s.execute(
            update(UpdateRound)
            .where(UpdateRound.id == round_id, UpdateRound.status == "queued")
            .values(**values)
        )
        if res.rowcount:  # type: ignore[attr-defined]
            return True
        row = s.execute(
            select(
                UpdateRound.status,
                UpdateRound.worker_id,
                UpdateRound.claim_token,
                UpdateRound.heartbeat_at,
            ).where(UpdateRound.id == round_id)
        ).first()
    if row is None or row.status != "running" or row.worker_id == worker_id():
        return False
    dead = owner_dead(db, row.worker_id, worker_stale_after_s)
    if dead and not pid_gone(row.worker_id or ""):
        # No process check possible (another host): also require the round itself to be
        # quiet for a worker-staleness period, so a slow heartbeat writer is not robbed.
        hb = aware(row.heartbeat_at)
        dead = hb is None or hb < utcnow() - timedelta(seconds=worker_stale_after_s)
    if not dead:
        hb = aware(row.heartbeat_at)
        dead = hb is not None and hb < utcnow() - timedelta(seconds=stale_after_s)
    if not dead:
        return False
    with db.session() as s:
        guard = (
            UpdateRound.claim_token == row.claim_token
            if row.claim_token is not None
            else UpdateRound.claim_token.is_(None)
        )
        res = s.execute(
            update(UpdateRound)
            .where(UpdateRound.id == round_id, UpdateRound.status == "running", guard)
            .values(**values)
        )
        if not res.rowcount:  # type: ignore[attr-defined]
            return False
        # A redelivery after the first worker died: start the round over, cleanly.
        s.query(RoundMetric).filter(RoundMetric.round_id == round_id).delete()
    log.warning("round %d: taking over from %s, which stopped", round_id, row.worker_id)
    return True


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


def finish(
    db: Database, round_id: int, status: str, retry_for_s: float = 60.0, **values: Any
) -> None:
    """Record a round's end. Retried through a database blip (backoff up to `retry_for_s`):
    a failure that is not recorded would leave the round "running" until the reaper sees
    its worker gone."""
    delay, deadline = 0.5, time.monotonic() + retry_for_s
    while True:
        try:
            update_round(
                db, round_id, status=status, finished_at=utcnow(), heartbeat_at=utcnow(), **values
            )
            return
        except SQLAlchemyError:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("round %d: could not record %s; retrying", round_id, status, exc_info=True)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


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

    def __init__(self, db: Database, round_id: int, every_s: float = 5.0) -> None:
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
                beat(self._db, "round", self._id)
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
