"""Initial schema: checkpoints, update_rounds, round_metrics, served_prompts.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "update_rounds",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("lineage", sa.String(64), nullable=False, server_default="default"),
        sa.Column("status", sa.String(16), nullable=False, server_default="queued"),
        sa.Column("stage", sa.String(32), nullable=True),
        sa.Column("progress", sa.Float(), nullable=False, server_default="0"),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("base_version", sa.Integer(), nullable=True),
        sa.Column("candidate_version", sa.Integer(), nullable=True),
        sa.Column("decision", sa.String(16), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("heartbeat_at", TS, nullable=True),
        sa.Column("worker_id", sa.String(255), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')",
            name="ck_update_rounds_status",
        ),
        sa.CheckConstraint(
            "decision IS NULL OR decision IN ('promoted', 'rejected')",
            name="ck_update_rounds_decision",
        ),
        sa.CheckConstraint("progress >= 0 AND progress <= 1", name="ck_update_rounds_progress"),
    )
    op.create_index("ix_update_rounds_lineage_status", "update_rounds", ["lineage", "status"])
    # One queued-or-running round per lineage, enforced by the database so two concurrent
    # POST /update-rounds cannot both start one.
    op.create_index(
        "uq_update_rounds_one_active",
        "update_rounds",
        ["lineage"],
        unique=True,
        postgresql_where=sa.text("status IN ('queued', 'running')"),
        sqlite_where=sa.text("status IN ('queued', 'running')"),
    )

    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("lineage", sa.String(64), nullable=False, server_default="default"),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("parent_version", sa.Integer(), nullable=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("source", sa.Text(), nullable=False, server_default=""),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("promoted_at", TS, nullable=True),
        sa.Column(
            "produced_by_round",
            sa.Integer(),
            sa.ForeignKey("update_rounds.id", ondelete="SET NULL"),
            nullable=True,
        ),
        sa.UniqueConstraint("lineage", "version", name="uq_checkpoints_lineage_version"),
        sa.CheckConstraint(
            "status IN ('champion', 'candidate', 'rejected', 'retired', 'failed')",
            name="ck_checkpoints_status",
        ),
    )
    op.create_index(
        "uq_checkpoints_one_champion",
        "checkpoints",
        ["lineage"],
        unique=True,
        postgresql_where=sa.text("status = 'champion'"),
        sqlite_where=sa.text("status = 'champion'"),
    )

    op.create_table(
        "round_metrics",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "round_id",
            sa.Integer(),
            sa.ForeignKey("update_rounds.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_round_metrics_round_id", "round_metrics", ["round_id"])

    op.create_table(
        "served_prompts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("lineage", sa.String(64), nullable=False, server_default="default"),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_served_prompts_created_at", "served_prompts", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_served_prompts_created_at", table_name="served_prompts")
    op.drop_table("served_prompts")
    op.drop_index("ix_round_metrics_round_id", table_name="round_metrics")
    op.drop_table("round_metrics")
    op.drop_index("uq_checkpoints_one_champion", table_name="checkpoints")
    op.drop_table("checkpoints")
    op.drop_index("uq_update_rounds_one_active", table_name="update_rounds")
    op.drop_index("ix_update_rounds_lineage_status", table_name="update_rounds")
    op.drop_table("update_rounds")
