"""Worker liveness and the round reaper (torch-free; the API and the workers both run it).

Each worker process keeps a `worker_heartbeats` row fresh; a round's owner is dead when its
process is gone (same host) or that row went stale. :func:`reap` fails the rounds of dead
owners and expires queued rounds nobody picked up; :class:`Reaper` runs it periodically.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from core.db.models import UpdateRound, WorkerHeartbeat, utcnow
from core.db.session import Database

log = logging.getLogger(__name__)


# Heartbeat rows silent for this long are deleted by the reaper.
FORGET_AFTER_S = 24 * 3600.0


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# A worker whose heartbeat row is older than this is dead (settings.worker_stale_after_s).
WORKER_STALE_AFTER_S = 30.0


# -------------------------------------------------------------------------- worker liveness


def beat(db: Database, role: str, current_round_id: int | None = None) -> None:
    """Create or refresh this process's `worker_heartbeats` row."""
    wid, now = worker_id(), utcnow()
    with db.session() as s:
        res = s.execute(
            update(WorkerHeartbeat)
            .where(WorkerHeartbeat.worker_id == wid)
            .values(heartbeat_at=now, current_round_id=current_round_id, role=role)
        )
        if res.rowcount:  # type: ignore[attr-defined]
            return
    try:
        with db.session() as s:
            s.add(
                WorkerHeartbeat(
                    worker_id=wid,
                    hostname=socket.gethostname(),
                    pid=os.getpid(),
                    role=role,
                    started_at=now,
                    heartbeat_at=now,
                    current_round_id=current_round_id,
                )
            )
    except IntegrityError:  # raced with ourselves (another thread): the row exists
        pass


def forget_worker(db: Database) -> None:
    """Remove this process's heartbeat row (clean shutdown)."""
    with db.session() as s:
        s.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.worker_id == worker_id()))


def live_workers(db: Database, stale_after_s: float, role: str | None = None) -> list[str]:
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    with db.session() as s:
        q = select(WorkerHeartbeat.worker_id).where(WorkerHeartbeat.heartbeat_at >= cutoff)
        if role is not None:
            q = q.where(WorkerHeartbeat.role == role)
        return list(s.scalars(q))


def pid_gone(owner: str) -> bool:
    """True when `owner` ("host:pid") is a process on this host that no longer exists."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def aware(ts: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes for timezone=True columns; they were written in UTC.
    if ts is not None and ts.tzinfo is None:
        return ts.replace(tzinfo=UTC)
    return ts


def owner_dead(db: Database, owner: str | None, stale_after_s: float) -> bool:
    """Is the worker that claimed a round gone? (its process vanished or its heartbeat stopped)"""
    if not owner:
        return True
    if pid_gone(owner):
        return True
    with db.session() as s:
        seen = s.scalar(
            select(WorkerHeartbeat.heartbeat_at).where(WorkerHeartbeat.worker_id == owner)
        )
    seen = aware(seen)
    return seen is None or seen < utcnow() - timedelta(seconds=stale_after_s)


# -------------------------------------------------------------------------- the reaper


def reap(
    db: Database,
    worker_stale_after_s: float = WORKER_STALE_AFTER_S,
    queued_ttl_s: float = 3600.0,
    round_stale_after_s: float = 300.0,
    suspects: dict[tuple[int, str | None], float] | None = None,
    grace_s: float = 0.0,
) -> dict[str, int]:
    """Fail running rounds whose owner is dead and expire queued rounds past their TTL.

    Every lineage, idempotent (guarded updates): the API and every worker run it
    periodically, so a dead worker's round is failed even if nobody posts a new round.
    With `suspects` (the caller's memory between calls) a round is failed only after its
    owner has been seen dead for `grace_s`: a redelivery (Celery requeues the task of a
    killed pool child at once) gets that long to take the round over and finish it.
    """
    failed = expired = 0
    now = utcnow()
    clock = time.monotonic()
    seen: set[tuple[int, str | None]] = set()
    with db.session() as s:
        running = s.execute(
            select(
                UpdateRound.id,
                UpdateRound.worker_id,
                UpdateRound.claim_token,
                UpdateRound.heartbeat_at,
            ).where(UpdateRound.status == "running")
        ).all()
    for r in running:
        hb = aware(r.heartbeat_at)
        quiet = hb is None or hb < now - timedelta(seconds=worker_stale_after_s)
        ancient = hb is None or hb < now - timedelta(seconds=round_stale_after_s)
        gone = pid_gone(r.worker_id or "")
        if not (gone or ancient or (quiet and owner_dead(db, r.worker_id, worker_stale_after_s))):
            continue
        key = (int(r.id), r.claim_token)
        seen.add(key)
        if suspects is not None and clock - suspects.setdefault(key, clock) < grace_s:
            continue
        guard = (
            UpdateRound.claim_token == r.claim_token
            if r.claim_token is not None
            else UpdateRound.claim_token.is_(None)
        )
        with db.session() as s:
            res = s.execute(
                update(UpdateRound)
                .where(UpdateRound.id == r.id, UpdateRound.status == "running", guard)
                .values(
                    status="failed",
                    error=f"worker lost: {r.worker_id} stopped while running this round",
                    finished_at=utcnow(),
                )
            )
            failed += int(res.rowcount or 0)  # type: ignore[attr-defined]
    with db.session() as s:
        res = s.execute(
            update(UpdateRound)
            .where(
                UpdateRound.status == "queued",
                UpdateRound.created_at < now - timedelta(seconds=queued_ttl_s),
            )
            .values(
                status="failed",
                error=f"expired: no worker started this round within {queued_ttl_s:g}s",
                finished_at=utcnow(),
            )
        )
        expired = int(res.rowcount or 0)  # type: ignore[attr-defined]
    if suspects is not None:
        for key in list(suspects):
            if key not in seen:
                del suspects[key]
    with db.session() as s:  # rows of processes long gone (kill -9 leaves them behind)
        s.execute(
            delete(WorkerHeartbeat).where(
                WorkerHeartbeat.heartbeat_at < now - timedelta(seconds=FORGET_AFTER_S)
            )
        )
    if failed or expired:
        log.warning("reaper: failed %d round(s) of dead workers, expired %d", failed, expired)
    return {"failed": failed, "expired": expired}


class Reaper:
    """Runs :func:`reap` (and, for workers, this process's heartbeat) every few seconds."""

    def __init__(
        self,
        db: Database,
        every_s: float,
        worker_stale_after_s: float,
        queued_ttl_s: float,
        round_stale_after_s: float,
        heartbeat_role: str | None = None,
        heartbeat_every_s: float = 5.0,
    ) -> None:
        self._db = db
        self._args = (worker_stale_after_s, queued_ttl_s, round_stale_after_s)
        self._every = every_s
        self._role = heartbeat_role
        self._beat_every = heartbeat_every_s
        self._suspects: dict[tuple[int, str | None], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="round-reaper")
        self.last_error: str | None = None
        self.last_run: datetime | None = None

    def start(self) -> Reaper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._role is not None:
            with contextlib.suppress(SQLAlchemyError):
                forget_worker(self._db)

    def _run(self) -> None:
        next_reap = 0.0
        tick = min(self._every, self._beat_every) if self._role else self._every
        while True:
            try:
                if self._role is not None:
                    beat(self._db, self._role)
                if time.monotonic() >= next_reap:
                    # Grace: one worker-staleness period for a redelivery to take over.
                    reap(self._db, *self._args, suspects=self._suspects, grace_s=self._args[0])
                    next_reap = time.monotonic() + self._every
                    self.last_run = utcnow()
                self.last_error = None
            except Exception as e:  # a database blip: try again next tick
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("reaper tick failed: %s", self.last_error)
            if self._stop.wait(tick):
                return
