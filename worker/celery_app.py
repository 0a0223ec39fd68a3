"""The worker's Celery application. It reads `Settings` when first configured, not at import.

`celery -A worker.celery_app ...` and `selflm worker` both use this `app`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from celery import Celery, signals

from core.queue import celery_config
from core.settings import Settings

log = logging.getLogger(__name__)

app = Celery("selflm", set_as_current=True)
TASK_MODULES = ["worker.tasks"]


def worker_config(settings: Settings) -> dict[str, Any]:
    return {**celery_config(settings), "include": TASK_MODULES}


def configure(celery: Celery, settings: Settings | None = None) -> Celery:
    conf = worker_config(settings or Settings())
    include = conf.pop("include")
    celery.conf.update(conf)
    celery.conf.include = include
    return celery


# Lazy defaults: Celery calls this the first time the configuration is read (worker start,
# `celery -A worker.celery_app inspect ping`), so nothing is read at import.
app.add_defaults(lambda: worker_config(Settings()))


# -------------------------------------------------------------------------- liveness
# The consumer (main) process keeps a `worker_heartbeats` row fresh and runs the reaper, so a
# round whose worker died is failed even when no API is up. Each round's child process has
# its own row while it runs (core.db.rounds.claim / Heartbeat).
_reaper: list[object] = []


@signals.worker_ready.connect  # type: ignore[untyped-decorator]
def _start_liveness(**_: object) -> None:
    from core.db.liveness import Reaper
    from core.db.session import Database

    s = Settings()
    reaper = Reaper(
        Database.from_settings(s),
        every_s=s.reaper_interval_s,
        worker_stale_after_s=s.worker_stale_after_s,
        queued_ttl_s=s.round_queued_ttl_s,
        round_stale_after_s=s.round_stale_after_s,
        heartbeat_role="celery",
        heartbeat_every_s=s.worker_heartbeat_s,
    ).start()
    _reaper.append(reaper)
    parent = os.environ.get("SELFLM_PARENT_PID", "")
    if parent.isdigit():
        _watch_parent(int(parent))


@signals.worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop_liveness(**_: object) -> None:
    for r in _reaper:
        r.stop()  # type: ignore[attr-defined]
    _reaper.clear()


def _watch_parent(pid: int) -> None:
    """An embedded worker stops when the `selflm serve` that started it is gone (even
    after a kill -9 of serve, which cannot stop it itself)."""

    def run() -> None:
        while True:
            threading.Event().wait(2.0)
            if os.getppid() != pid:
                log.warning("parent %d is gone; stopping the embedded worker", pid)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=run, daemon=True, name="parent-watch").start()
