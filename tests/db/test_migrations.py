"""Alembic migrations on the machine's PostgreSQL and on SQLite, and the schema they build."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db.models import Base, Checkpoint, RoundMetric, UpdateRound
from core.db.session import Database, downgrade, make_engine, upgrade
from core.registry import get_champion, set_champion

# Written out from DESIGN.md's "Data" section, not derived from the ORM, so a column dropped
# from both the models and the migration is still caught.
EXPECTED_COLUMNS: dict[str, set[str]] = {
    "checkpoints": {
        "id",
        "lineage",
        "version",
        "parent_version",
        "path",
        "manifest",
        "status",
        "source",
        "created_at",
        "promoted_at",
        "produced_by_round",
    },
    "update_rounds": {
        "id",
        "lineage",
        "status",
        "stage",
        "progress",
        "params",
        "base_version",
        "candidate_version",
        "decision",
        "reason",
        "error",
        "created_at",
        "started_at",
        "finished_at",
        "heartbeat_at",
        "worker_id",
        "attempts",
        "stage_progress",
        "progress_detail",
        "claim_token",
    },
    "round_metrics": {"id", "round_id", "stage", "name", "value", "step", "created_at"},
    "served_prompts": {"id", "lineage", "prompt", "model_version", "created_at"},
    "worker_heartbeats": {
        "worker_id",
        "hostname",
        "pid",
        "role",
        "started_at",
        "heartbeat_at",
        "current_round_id",
    },
}
HEAD = "0002"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """An empty database on each backend (PostgreSQL: a fresh database, dropped after)."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_db_url"
    yield request.getfixturevalue(fixture)


@pytest.fixture
def migrated(db_url: str) -> Iterator[Database]:
    upgrade(db_url)
    db = Database(db_url)
    try:
        yield db
    finally:
        db.dispose()


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _columns(url: str, table: str) -> dict[str, Any]:
    engine = make_engine(url)
    try:
        return {c["name"]: c for c in sa.inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def _revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def _checkpoint(lineage: str, version: int, status: str) -> Checkpoint:
    return Checkpoint(
        lineage=lineage,
        version=version,
        path=f"/store/{lineage}/v{version:06d}",
        manifest={"files": {}},
        status=status,
    )


# --------------------------------------------------------------------------- up, down, up


def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    assert _tables(db_url) == set(), "the fixture should hand out an empty database"

    upgrade(db_url)
    tables = _tables(db_url)
    assert set(EXPECTED_COLUMNS) <= tables
    assert _revision(db_url) == HEAD
    for table, expected in EXPECTED_COLUMNS.items():
        assert set(_columns(db_url, table)) == expected, table

    checkpoint_cols = _columns(db_url, "checkpoints")
    for required in ("version", "path", "manifest", "status", "lineage", "created_at"):
        assert checkpoint_cols[required]["nullable"] is False, required
    assert checkpoint_cols["parent_version"]["nullable"] is True

    downgrade(db_url)
    assert not set(EXPECTED_COLUMNS) & _tables(db_url)
    assert _revision(db_url) is None

    upgrade(db_url)
    assert set(EXPECTED_COLUMNS) <= _tables(db_url)
    assert _revision(db_url) == HEAD

    # The re-created schema is usable, not just present.
    db = Database(db_url)
    try:
        with db.session() as s:
            s.add(_checkpoint("default", 1, "champion"))
        with db.session() as s:
            champ = get_champion(s, "default")
            assert champ is not None and champ.version == 1
    finally:
        db.dispose()


def test_upgrade_is_idempotent(db_url: str) -> None:
    upgrade(db_url)
    upgrade(db_url)  # already at head: a no-op, not an error
    assert _revision(db_url) == HEAD


# --------------------------------------------------------------------------- constraints


def test_one_champion_per_lineage_enforced_by_database(migrated: Database) -> None:
    with migrated.session() as s:
        s.add(_checkpoint("default", 1, "champion"))

    # A second champion in the same lineage: rejected by the database itself.
    with pytest.raises(IntegrityError), migrated.session() as s:
        s.add(_checkpoint("default", 2, "champion"))
        s.flush()

    # Also through plain SQL, bypassing the ORM entirely.
    with pytest.raises(IntegrityError), migrated.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO checkpoints (lineage, version, path, manifest, status, source,"
                " created_at) VALUES ('default', 3, '/x', '{}', 'champion', '',"
                " CURRENT_TIMESTAMP)"
            )
        )

    # A champion in another lineage is fine.
    with migrated.session() as s:
        s.add(_checkpoint("other", 1, "champion"))

    # Candidates beside the champion are fine, any number of them.
    with migrated.session() as s:
        s.add(_checkpoint("default", 2, "candidate"))
        s.add(_checkpoint("default", 3, "candidate"))

    with migrated.session() as s:
        champs = s.scalars(sa.select(Checkpoint).where(Checkpoint.status == "champion")).all()
        assert sorted((c.lineage, c.version) for c in champs) == [("default", 1), ("other", 1)]


def test_promote_retires_old_champion(migrated: Database) -> None:
    with migrated.session() as s:
        s.add(_checkpoint("default", 1, "champion"))
        s.add(_checkpoint("default", 2, "candidate"))
        s.add(_checkpoint("other", 1, "champion"))

    with migrated.session() as s:
        promoted = set_champion(s, "default", 2)
        assert promoted.version == 2

    with migrated.session() as s:
        rows = {(c.lineage, c.version): c.status for c in s.scalars(sa.select(Checkpoint)).all()}
        assert rows == {
            ("default", 1): "retired",
            ("default", 2): "champion",
            ("other", 1): "champion",  # another lineage is untouched
        }
        champ = get_champion(s, "default")
        assert champ is not None and champ.version == 2 and champ.promoted_at is not None

    # Roll back to v1 the same way.
    with migrated.session() as s:
        set_champion(s, "default", 1)
    with migrated.session() as s:
        champ = get_champion(s, "default")
        assert champ is not None and champ.version == 1

    with pytest.raises(LookupError), migrated.session() as s:
        set_champion(s, "default", 99)


def test_version_unique_and_status_checked(migrated: Database) -> None:
    with migrated.session() as s:
        s.add(_checkpoint("default", 1, "champion"))
    with pytest.raises(IntegrityError), migrated.session() as s:
        s.add(_checkpoint("default", 1, "candidate"))
        s.flush()
    with pytest.raises(IntegrityError), migrated.session() as s:
        s.add(_checkpoint("default", 2, "bogus"))
        s.flush()
    with pytest.raises(IntegrityError), migrated.session() as s:
        s.add(UpdateRound(params={}, progress=1.5))
        s.flush()


def test_round_metrics_cascade_with_round(migrated: Database) -> None:
    with migrated.session() as s:
        r = UpdateRound(params={"k": 2})
        r.metrics.append(RoundMetric(stage="evaluate", name="ppl", value=12.5, step=0))
        s.add(r)
        s.flush()
        round_id = r.id
    with migrated.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM update_rounds WHERE id = :id"), {"id": round_id})
    with migrated.session() as s:
        assert s.scalars(sa.select(RoundMetric)).all() == []


# --------------------------------------------------------------------------- ORM vs schema


def test_orm_models_match_migrated_schema(migrated: Database) -> None:
    with migrated.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diffs = compare_metadata(ctx, Base.metadata)

    def kind(d: Any) -> str:
        # Column-level changes come as a list of tuples; table/index ones as a tuple.
        first = d[0] if isinstance(d, list) else d
        return str(first[0])

    def check_only(d: Any) -> bool:
        return not isinstance(d, list) and isinstance(d[1], sa.CheckConstraint)

    # Check constraints live only in the migration (autogenerate does not compare them);
    # everything else — tables, columns, types, nullability, indexes, FKs — must match.
    relevant = [d for d in diffs if not check_only(d)]
    assert relevant == [], relevant

    # Sanity: the comparison does see differences when there are some.
    extra = sa.MetaData()
    for t in Base.metadata.tables.values():
        t.to_metadata(extra)
    sa.Table("not_migrated", extra, sa.Column("id", sa.Integer, primary_key=True))
    with migrated.engine.connect() as conn:
        ctx = MigrationContext.configure(conn)
        assert any(kind(d) == "add_table" for d in compare_metadata(ctx, extra))


def test_champion_index_is_partial_unique(migrated: Database) -> None:
    indexes = {i["name"]: i for i in sa.inspect(migrated.engine).get_indexes("checkpoints")}
    assert "uq_checkpoints_one_champion" in indexes
    assert indexes["uq_checkpoints_one_champion"]["unique"]
    assert indexes["uq_checkpoints_one_champion"]["column_names"] == ["lineage"]


def test_session_rolls_back_on_error(migrated: Database) -> None:
    with pytest.raises(RuntimeError), migrated.session() as s:
        s.add(_checkpoint("default", 1, "champion"))
        s.flush()
        raise RuntimeError("boom")
    with Session(migrated.engine) as s:
        assert s.scalars(sa.select(Checkpoint)).all() == []


# --------------------------------------------------------------------------- the pg fixture


@pytest.mark.parametrize("ci", ["true", ""])
def test_unreachable_postgres_skips_locally_and_fails_under_ci(ci: str) -> None:
    """conftest's `pg_url`: skip when PostgreSQL is down on a laptop, fail when CI is set."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    env = dict(os.environ, CI=ci, SELFLM_TEST_PG_URL=f"postgresql+psycopg://x@127.0.0.1:{port}/x")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rs",
            f"{Path(__file__).resolve()}::test_upgrade_is_idempotent[postgresql]",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert "unreachable" in out, out
    if ci:
        assert proc.returncode == 1, out
        assert "1 error" in out or "1 failed" in out, out
    else:
        assert proc.returncode == 0, out
        assert "1 skipped" in out, out
