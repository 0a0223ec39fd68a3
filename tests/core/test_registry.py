"""The checkpoint registry against real PostgreSQL and SQLite: concurrent promotions and
publishes, the guards a round's promotion relies on, and the module staying torch-free."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from core import registry
from core.db import rounds as records
from core.db.models import Checkpoint
from core.db.session import Database, upgrade
from core.modeling.loader import LoadedBase, tiny_model
from core.registry import CheckpointRef, PromotionConflict


@pytest.fixture(scope="module")
def tiny() -> LoadedBase:
    return tiny_model("llama")


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_db_url")
    else:
        url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(url)
    database = Database(url)
    yield database
    database.dispose()


def _publish(db: Database, root: Path, tiny: LoadedBase, **kw: Any) -> CheckpointRef:
    kw.setdefault("parent_version", None)
    kw.setdefault("source", "test")
    return registry.publish(db, root, "default", tiny.model, tiny.tokenizer, **kw)


def _statuses(db: Database) -> dict[int, str]:
    with db.session() as s:
        return {c.version: c.status for c in s.scalars(sa.select(Checkpoint))}


def _together(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run fn(0..n-1) in n threads released at once; each result or exception, in order."""
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def test_concurrent_promotes_queue_on_the_lineage_lock(
    db: Database, tmp_path: Path, tiny: LoadedBase
) -> None:
    for _ in range(3):
        _publish(db, tmp_path, tiny)
    with db.session() as s:
        registry.set_champion(s, "default", 1)

    def promote_many(i: int) -> list[Any]:
        out: list[Any] = []
        for k in range(10):
            try:
                v = 1 + (i + k) % 3
                out.append(registry.promote(db, "default", v, redis_url=None, verify=False))
            except Exception as e:
                out.append(e)
        return out

    # 200 promotions from 20 threads (without the lock about half of them fail on
    # PostgreSQL with a unique violation or a deadlock): every one waits its turn.
    results = [r for rs in _together(20, promote_many) for r in rs]
    assert [r for r in results if isinstance(r, Exception)] == []
    statuses = _statuses(db)
    assert sorted(statuses.values()) == ["champion", "retired", "retired"], statuses


def test_concurrent_publishes_take_distinct_versions(
    db: Database, tmp_path: Path, tiny: LoadedBase
) -> None:
    results = _together(4, lambda i: _publish(db, tmp_path, tiny, source=f"writer {i}"))
    assert all(isinstance(r, CheckpointRef) for r in results), results
    assert sorted(r.version for r in results) == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "default").iterdir()) == [
        f"v{v:06d}" for v in (1, 2, 3, 4)
    ]
    for r in results:
        assert registry.get(db, "default", r.version) == r
        assert r.manifest["version"] == r.version and r.manifest["source"] == r.source


def test_round_promotion_guards(db: Database, tmp_path: Path, tiny: LoadedBase) -> None:
    for _ in range(3):
        _publish(db, tmp_path, tiny)
    with db.session() as s:
        registry.set_champion(s, "default", 2)
    rnd = records.create_round(db, "default", {})
    # The round started from v1, but v2 is the champion now: refused, nothing moves.
    with pytest.raises(PromotionConflict, match="champion moved from v1 to v2"):
        registry.promote(db, "default", 3, redis_url=None, expect_champion=1, round_id=rnd.id)
    assert _statuses(db)[2] == "champion"
    # A cancelled round promotes nothing either.
    records.cancel(db, rnd.id)
    with pytest.raises(records.RoundCancelled):
        registry.promote(db, "default", 3, redis_url=None, expect_champion=2, round_id=rnd.id)
    assert _statuses(db) == {1: "candidate", 2: "champion", 3: "candidate"}
    # Not promotable, or not there at all.
    with db.session() as s:
        s.execute(sa.update(Checkpoint).where(Checkpoint.version == 1).values(status="failed"))
    with pytest.raises(PromotionConflict, match="is failed"):
        registry.promote(db, "default", 1, redis_url=None)
    with pytest.raises(registry.CheckpointNotFoundError):
        registry.promote(db, "default", 9, redis_url=None)
    # A live round's promotion moves the pointer and records its candidate together.
    live = records.create_round(db, "default", {})
    ref = registry.promote(db, "default", 3, redis_url=None, expect_champion=2, round_id=live.id)
    assert ref.status == "champion" and registry.champion_version(db, "default") == 3
    row = records.get_round(db, live.id)
    assert row is not None and row.candidate_version == 3


def test_open_verifies_against_the_recorded_manifest(
    db: Database, tmp_path: Path, tiny: LoadedBase
) -> None:
    import torch

    ref = _publish(db, tmp_path, tiny)
    loaded = registry.open(ref, torch.device("cpu"), torch.float32)
    assert loaded.model.config.hidden_size == tiny.model.config.hidden_size
    weights = ref.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(registry.CheckpointError, match="checksum mismatch"):
        registry.open(ref, torch.device("cpu"), torch.float32)


def test_registry_imports_no_torch() -> None:
    code = (
        "import sys, core.registry, core.store, core.metric_names, core.report; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
