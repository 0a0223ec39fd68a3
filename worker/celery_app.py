"""The worker's Celery application. It reads `Settings` when first configured, not at import.

`celery -A worker.celery_app ...` and `selflm worker` both use this `app`.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from core.queue import celery_config
from core.settings import Settings

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
