"""The Celery application. It reads `Settings` when first configured, not at import.

`celery -A selflm.worker.celery_app ...` and `selflm worker` both use this `app`.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from selflm.settings import Settings

QUEUE = "gpu"
ROUND_TASK = "selflm.run_round"

app = Celery("selflm", set_as_current=True)


def celery_config(settings: Settings) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "broker_url": settings.effective_broker_url,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": QUEUE,
        "task_routes": {ROUND_TASK: {"queue": QUEUE}},
        # The round row is the source of truth, so results are not stored.
        "task_ignore_result": True,
        # Redeliver a round whose worker died; the task's guarded claim makes that safe.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": settings.round_soft_time_limit_s,
        "task_time_limit": settings.round_time_limit_s,
        # A fresh child per round returns the round's model memory to the OS.
        "worker_max_tasks_per_child": 1,
        "worker_hijack_root_logger": False,
        "include": ["selflm.worker.tasks"],
    }
    if settings.uses_filesystem_broker:
        folder = settings.broker_folder
        for sub in ("queue", "processed"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
        }
    else:
        # Redis: a message not acked within the visibility timeout is redelivered; it must
        # outlast the longest round or a running round would be delivered twice.
        conf["broker_transport_options"] = {"visibility_timeout": settings.round_time_limit_s + 600}
    return conf


def configure(celery: Celery, settings: Settings | None = None) -> Celery:
    conf = celery_config(settings or Settings())
    include = conf.pop("include")
    celery.conf.update(conf)
    celery.conf.include = include
    return celery


# Lazy defaults: Celery calls this the first time the configuration is read (worker start,
# `celery -A selflm.worker.celery_app inspect ping`), so nothing is read at import.
app.add_defaults(lambda: celery_config(Settings()))
