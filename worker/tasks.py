"""The round task: takes only a round id; the round row is the source of truth."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from core.db.liveness import forget_worker
from core.db.session import Database
from core.queue import QUEUE, ROUND_TASK
from core.settings import Settings
from worker.celery_app import app

log = logging.getLogger(__name__)


@app.task(  # type: ignore[untyped-decorator]
    name=ROUND_TASK, queue=QUEUE, acks_late=True, ignore_result=True
)
def run_round_task(round_id: int) -> dict[str, Any] | None:
    from worker.rounds.pipeline import run_round

    settings = Settings()
    db = Database.from_settings(settings)
    try:
        outcome = run_round(settings, db, int(round_id))
    except SoftTimeLimitExceeded:
        log.error("round %s hit its soft time limit", round_id)
        return None
    finally:
        # This child exits after one round (max_tasks_per_child=1): drop its liveness row so
        # it is not mistaken for a worker that died.
        with contextlib.suppress(Exception):
            forget_worker(db)
        db.dispose()
    if outcome is None:
        return None
    return {"decision": outcome.decision, "candidate_version": outcome.candidate_version}
