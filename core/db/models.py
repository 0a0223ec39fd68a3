"""SQLAlchemy 2.0 typed models: checkpoints, update rounds, round metrics, served prompts.

The schema is owned by the Alembic migrations in ``migrations/``; these classes must
match them (``tests/db/test_migrations.py`` checks that they do).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Every timestamp column is aware UTC on PostgreSQL and SQLite alike (core/db/types.py).
from core.db.types import UTCDateTime as DateTime

CHECKPOINT_STATUSES = ("champion", "candidate", "rejected", "retired", "failed")
ROUND_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
ROUND_DECISIONS = ("promoted", "rejected")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON}


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (
        UniqueConstraint("lineage", "version", name="uq_checkpoints_lineage_version"),
        # One champion per lineage, enforced by the database (partial unique index works
        # on both PostgreSQL and SQLite).
        Index(
            "uq_checkpoints_one_champion",
            "lineage",
            unique=True,
            postgresql_where=text("status = 'champion'"),
            sqlite_where=text("status = 'champion'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    lineage: Mapped[str] = mapped_column(String(64), default="default")
    version: Mapped[int] = mapped_column(Integer)
    parent_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    path: Mapped[str] = mapped_column(Text)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    produced_by_round: Mapped[int | None] = mapped_column(
        ForeignKey("update_rounds.id", ondelete="SET NULL"), nullable=True
    )


class UpdateRound(Base):
    __tablename__ = "update_rounds"
    __table_args__ = (
        Index("ix_update_rounds_lineage_status", "lineage", "status"),
        Index(
            "uq_update_rounds_one_active",
            "lineage",
            unique=True,
            postgresql_where=text("status IN ('queued', 'running')"),
            sqlite_where=text("status IN ('queued', 'running')"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    lineage: Mapped[str] = mapped_column(String(64), default="default")
    status: Mapped[str] = mapped_column(String(16), default="queued")
    stage: Mapped[str | None] = mapped_column(String(32), nullable=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    base_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    candidate_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    decision: Mapped[str | None] = mapped_column(String(16), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Progress inside the current stage (0..1) and what it counts (done/total/unit, running
    # loss, ETA ...), written at a bounded rate by the worker.
    stage_progress: Mapped[float] = mapped_column(Float, default=0.0)
    progress_detail: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Set by the delivery that claimed the round: a redelivery compares it with the live
    # owner's to tell "my worker died" from "someone else is running this".
    claim_token: Mapped[str | None] = mapped_column(String(64), nullable=True)

    metrics: Mapped[list[RoundMetric]] = relationship(
        back_populates="round", cascade="all, delete-orphan", order_by="RoundMetric.id"
    )


class RoundMetric(Base):
    __tablename__ = "round_metrics"
    __table_args__ = (Index("ix_round_metrics_round_id", "round_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("update_rounds.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(128))
    value: Mapped[float] = mapped_column(Float)
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    round: Mapped[UpdateRound] = relationship(back_populates="metrics")


class ServedPrompt(Base):
    __tablename__ = "served_prompts"
    __table_args__ = (Index("ix_served_prompts_created_at", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    lineage: Mapped[str] = mapped_column(String(64), default="default")
    prompt: Mapped[str] = mapped_column(Text)
    model_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WorkerHeartbeat(Base):
    """One row per live worker process (Celery worker or embedded worker), kept fresh by it."""

    __tablename__ = "worker_heartbeats"

    worker_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    role: Mapped[str] = mapped_column(String(32), default="worker")
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    current_round_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
