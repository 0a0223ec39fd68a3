"""The round's progress writer on a real (SQLite) round row, with a hand-driven clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.db import rounds as records
from core.db.session import Database, upgrade
from worker.rounds.progress import SLICES, Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Database:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    upgrade(url)
    return Database(url)


def _row(db: Database, rid: int) -> tuple[Any, ...]:
    row = records.get_round(db, rid)
    assert row is not None
    return row.stage, row.stage_progress, row.progress, row.progress_detail


def test_writes_are_bounded_and_progress_only_moves_forward(db: Database) -> None:
    rid = records.create_round(db, "default", {}).id
    clock = Clock()
    progress = Progress(db, rid, min_interval_s=1.0, clock=clock)

    progress.begin("generate")
    assert _row(db, rid) == ("generate", 0.0, 0.0, None)
    progress.tick(10, 100, "tokens")  # within the interval: nothing written
    clock.now += 1.0
    progress.tick(40, 100, "tokens")
    start, end = SLICES["generate"]
    assert _row(db, rid) == (
        "generate",
        0.4,
        pytest.approx(start + 0.4 * (end - start)),
        {"done": 40, "total": 100, "unit": "tokens"},
    )
    progress.end()
    assert _row(db, rid)[1:3] == (1.0, pytest.approx(end))

    progress.begin("update")
    writes = progress.writes
    asked: list[int] = []

    def loss() -> dict[str, Any]:
        asked.append(1)
        return {"loss": 2.5}

    for step in range(1, 1001):  # a thousand steps inside one interval: no write at all,
        progress.tick(step, 1000, "steps", loss)
    assert progress.writes == writes and not asked  # ...and the loss was never computed
    clock.now += 1.0
    progress.tick(500, 1000, "steps", lambda: {"loss": 2.5})
    assert _row(db, rid)[1] == 0.5 and _row(db, rid)[3] == {
        "done": 500,
        "total": 1000,
        "unit": "steps",
        "loss": 2.5,
    }
    clock.now += 1.0
    progress.tick(100, 1000, "steps")  # a smaller count is not news: nothing moves back
    _, stage_progress, overall, detail = _row(db, rid)
    start, end = SLICES["update"]
    assert stage_progress == 0.5 and overall == pytest.approx(start + 0.5 * (end - start))
    assert detail == {"done": 500, "total": 1000, "unit": "steps", "loss": 2.5}
    progress.end()
    assert _row(db, rid)[:3] == ("update", 1.0, pytest.approx(end))
