"""The round queue both sides share: its name, the task's name and Celery's settings.

The API enqueues by task name (`send_task`), so it never imports the worker or the pipeline;
the worker builds its Celery app from the same settings (`worker.celery_app`).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from core.settings import Settings

QUEUE = "gpu"
ROUND_TASK = "selflm.run_round"


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


def make_client(settings: Settings) -> Celery:
    """The API's sending side. Every broker operation is bounded by broker_timeout_s: a
    blackholed Redis (connections open, nothing answered) must fail the request with 503,
    not hang it for minutes."""
    client = Celery("selflm-client", set_as_current=False)
    conf = celery_config(settings)
    t = settings.broker_timeout_s
    conf["broker_connection_timeout"] = t
    if not settings.uses_filesystem_broker:
        conf["broker_transport_options"] = {
            **conf["broker_transport_options"],
            "socket_timeout": t,
            "socket_connect_timeout": t,
            "socket_keepalive": True,
            "retry_on_timeout": False,
            "health_check_interval": 0,
        }
    client.conf.update(conf)
    return client


def enqueue_round(client: Celery, round_id: int) -> None:
    # retry=False: a broker that is down must fail the request now, not hang it.
    client.send_task(ROUND_TASK, args=[round_id], queue=QUEUE, retry=False)
