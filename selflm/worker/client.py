"""Enqueue rounds from the API (send_task by name: the API never imports the pipeline)."""

from __future__ import annotations

from celery import Celery

from selflm.settings import Settings
from selflm.worker.celery_app import QUEUE, ROUND_TASK, celery_config


def make_client(settings: Settings) -> Celery:
    client = Celery("selflm-client", set_as_current=False)
    conf = celery_config(settings)
    conf.pop("include")
    client.conf.update(conf)
    return client


def enqueue_round(client: Celery, round_id: int) -> None:
    # retry=False: a broker that is down must fail the request now, not hang it.
    client.send_task(ROUND_TASK, args=[round_id], queue=QUEUE, retry=False)
