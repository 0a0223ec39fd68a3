"""§4: rounds are recovered after `kill -9` of a real Celery worker.

Real PostgreSQL, real Redis broker, a real `selflm worker` process, the real app (its reaper
running), tiny:llama rounds long enough to be caught in a stage:

* mid-`update`, SIGKILL of the round's pool child: Celery rejects the message back to the
  queue (acks_late + reject_on_worker_lost), the redelivery sees that the owner process is
  gone and takes the round over (new claim token, attempts == 2): **retried to completion**.
* mid-`decide`, SIGKILL of the whole worker (main process and children, as an OOM kill or a
  lost machine): nothing redelivers soon (the message waits for Redis's visibility timeout),
  so the API's periodic reaper sees the owner gone and **fails** the round; the lineage is
  free for the next round at once, and a late redelivery finds a finished round and drops.
* a queued round nobody picks up expires; a failure that cannot be recorded through a
  database blip is retried until it is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.engine import make_url

from app.main import create_app
from core.db import rounds as records
from core.db.models import UpdateRound, utcnow
from core.db.session import Database, upgrade
from core.settings import Settings
from tests.faults import TcpProxy

REDIS = os.environ.get("SELFLM_TEST_REDIS_URL", "redis://127.0.0.1:6379")
DB_INDEX = 13
FAST = {
    "SELFLM_WORKER_STALE_AFTER_S": "20",
    "SELFLM_REAPER_INTERVAL_S": "1",
    "SELFLM_WORKER_HEARTBEAT_S": "1",
}
# Long enough that each stage lasts seconds on the tiny model.
LONG: dict[str, Any] = {
    "num_prompts": 4,
    "samples_per_prompt": 2,
    "max_new_tokens": 12,
    "filters": False,
    "train_size": 6,
    "valid_size": 2,
    "eval_passages": 8,
    "diversity_prompts": 12,
    "epochs": 20,
    "batch_size": 4,
    "max_length": 64,
    "diversity_tolerance": 1.0,
    "base_diversity_tolerance": 1.0,
}


class Env:
    def __init__(self, tmp: Path, db_url: str) -> None:
        self.tmp, self.db_url = tmp, db_url
        self.broker = f"{REDIS}/{DB_INDEX}"
        self.environ = {k: v for k, v in os.environ.items() if not k.startswith("SELFLM_")}
        self.environ.update(
            SELFLM_DATABASE_URL=db_url,
            SELFLM_BROKER_URL=self.broker,
            SELFLM_CHECKPOINT_DIR=str(tmp / "checkpoints"),
            SELFLM_BASE_MODEL="tiny:llama",
            SELFLM_DEVICE="cpu",
            **FAST,
        )
        self.settings = Settings(
            database_url=db_url,
            broker_url=self.broker,
            checkpoint_dir=str(tmp / "checkpoints"),
            base_model="tiny:llama",
            device="cpu",
            embedded_worker=False,
            worker_stale_after_s=20,
            reaper_interval_s=1,
            round_queued_ttl_s=60,
        )
        self.db = Database(db_url)
        self.worker: subprocess.Popen[bytes] | None = None
        self.client: TestClient

    def start_worker(self) -> None:
        log = (self.tmp / "worker.log").open("a")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "selflm.cli", "worker"],
            env=self.environ,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait()

    def log_tail(self) -> str:
        return (self.tmp / "worker.log").read_text()[-5000:]

    def row(self, rid: int) -> UpdateRound:
        row = records.get_round(self.db, rid)
        assert row is not None
        return row

    def wait(self, rid: int, pred: Any, timeout: float, what: str) -> UpdateRound:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.row(rid)
            if pred(row):
                return row
            time.sleep(0.1)
        log = (self.tmp / "worker.log").read_text()[-5000:]
        raise AssertionError(f"round {rid}: {what} did not happen: {self.row(rid).__dict__}\n{log}")

    def start_round(self, params: dict[str, Any]) -> int:
        r = self.client.post("/update-rounds", json=params)
        assert r.status_code == 202, r.text
        return int(r.json()["id"])


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, pg_module_db_url: str) -> Iterator[Env]:
    redis.Redis.from_url(f"{REDIS}/{DB_INDEX}").flushdb()
    upgrade(pg_module_db_url)
    e = Env(tmp_path_factory.mktemp("kill"), pg_module_db_url)
    with TestClient(create_app(e.settings)) as client:
        e.client = client
        e.start_worker()
        try:
            yield e
        finally:
            e.stop_worker()


def _done(row: UpdateRound) -> bool:
    return row.status in ("succeeded", "failed", "cancelled")


def test_kill_9_of_the_pool_child_mid_update_is_retried_to_completion(env: Env) -> None:
    rid = env.start_round(LONG)
    row = env.wait(rid, lambda r: r.stage == "update", 300, "reaching update")
    owner = row.worker_id or ""
    token = row.claim_token
    child = int(owner.rpartition(":")[2])
    assert env.worker is not None and child != env.worker.pid  # the pool child runs it
    os.kill(child, signal.SIGKILL)
    row = env.wait(rid, _done, 600, "finishing after the kill")
    assert row.status == "succeeded", (row.error, env.log_tail())
    assert row.attempts == 2 and row.worker_id != owner and row.claim_token != token
    # The takeover started the round over: one set of metrics, not two.
    gen = [m for m in row.metrics if m.stage == "generate" and m.name == "tokens"]
    assert len(gen) == 1


def test_kill_9_of_the_whole_worker_mid_decide_fails_the_round(env: Env) -> None:
    rid = env.start_round(LONG)
    row = env.wait(rid, lambda r: r.stage == "decide", 600, "reaching decide")
    assert env.worker is not None
    os.killpg(env.worker.pid, signal.SIGKILL)  # main and children: nobody requeues
    env.worker.wait()
    # No POST, no redelivery: the API's periodic reaper alone finds the owner gone. The bound
    # is generous (a hang would be forever); the settings make it ~20 s here (the grace a
    # redelivery gets, worker_stale_after_s, plus one reaper interval).
    row = env.wait(rid, lambda r: r.status != "running", 120, "the reaper failing it")
    assert row.status == "failed" and "worker lost" in (row.error or "")
    env.start_worker()
    # The lineage is not blocked: the next round runs.
    nxt = env.start_round({**LONG, "epochs": 1, "diversity_prompts": 4})
    assert env.wait(nxt, _done, 600, "the next round").status == "succeeded"


def test_a_queued_round_nobody_picks_up_expires(env: Env) -> None:
    row = records.create_round(env.db, "orphans", {})  # no worker serves this lineage's rows
    with env.db.session() as s:
        s.execute(
            update(UpdateRound)
            .where(UpdateRound.id == row.id)
            .values(created_at=utcnow() - timedelta(seconds=120))
        )
    got = env.wait(row.id, _done, 60, "expiry of a stale queued round")
    assert got.status == "failed" and "expired" in (got.error or "")


def test_a_failure_is_recorded_through_a_database_blip(env: Env) -> None:
    url = make_url(env.db_url)
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        via = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        db = Database(via, connect_timeout_s=1, statement_timeout_s=1, pool_timeout_s=1)
        row = records.create_round(db, "blip", {})
        proxy.set_mode("cut")
        timer = threading.Timer(3.0, proxy.set_mode, args=("pass",))
        timer.start()
        records.finish(db, row.id, "failed", error="boom")  # retried until the DB is back
        timer.join()
        db.dispose()
    got = env.row(row.id)
    assert got.status == "failed" and got.error == "boom"
