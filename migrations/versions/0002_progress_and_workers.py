"""Progress inside a stage, the round's claim token, and worker heartbeats.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("update_rounds") as b:
        b.add_column(sa.Column("stage_progress", sa.Float(), nullable=False, server_default="0"))
        b.add_column(sa.Column("progress_detail", sa.JSON(), nullable=True))
        b.add_column(sa.Column("claim_token", sa.String(64), nullable=True))
    op.create_table(
        "worker_heartbeats",
        sa.Column("worker_id", sa.String(255), primary_key=True),
        sa.Column("hostname", sa.String(255), nullable=False, server_default=""),
        sa.Column("pid", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("role", sa.String(32), nullable=False, server_default="worker"),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("heartbeat_at", TS, nullable=False),
        sa.Column("current_round_id", sa.Integer(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("worker_heartbeats")
    with op.batch_alter_table("update_rounds") as b:
        b.drop_column("claim_token")
        b.drop_column("progress_detail")
        b.drop_column("stage_progress")
