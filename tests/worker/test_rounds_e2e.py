"""Rounds end to end: real Celery worker on Redis, real PostgreSQL, tiny model, HTTP app."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.main import create_app
from core.db.models import Checkpoint, RoundMetric
from core.db.session import Database, upgrade
from core.queue import enqueue_round, make_client
from core.settings import Settings
from worker.rounds.pipeline import run_round

REDIS = os.environ.get("SELFLM_TEST_REDIS_URL", "redis://127.0.0.1:6379")
# Progress writes from the worker: often enough that a short update stage shows several.
PROGRESS_INTERVAL_S = 0.05

# Small but real: every stage runs, in seconds, on the tiny model.
SMALL: dict[str, Any] = {
    "num_prompts": 4,
    "samples_per_prompt": 3,
    "max_new_tokens": 16,
    "min_words": 3,
    "train_size": 6,
    "valid_size": 3,
    "eval_passages": 6,
    "diversity_prompts": 3,
    "epochs": 1,
    "batch_size": 4,
    "max_length": 48,
}
# Real replay text at a high rate teaches a random-init model the domain's token statistics:
# dev perplexity falls by a wide margin, so this candidate is genuinely better.
BETTER = {
    **SMALL,
    "replay_fraction": 0.8,
    "learning_rate": 3e-3,
    "epochs": 2,
    "diversity_tolerance": 1.0,
    "base_diversity_tolerance": 1.0,
}


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, pg_module_db_url: str
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("rounds")
    db_index = 11
    broker = f"{REDIS}/{db_index}"
    redis.Redis.from_url(broker).flushdb()
    settings = Settings(
        database_url=pg_module_db_url,
        broker_url=broker,
        redis_url=f"{REDIS}/{db_index}",
        checkpoint_dir=str(tmp / "checkpoints"),
        base_model="tiny:llama",
        embedded_worker=False,
    )
    upgrade(settings.database_url)
    environ = dict(os.environ)
    environ.update(
        SELFLM_DATABASE_URL=settings.database_url,
        SELFLM_BROKER_URL=broker,
        SELFLM_REDIS_URL=broker,
        SELFLM_CHECKPOINT_DIR=settings.checkpoint_dir,
        SELFLM_BASE_MODEL="tiny:llama",
        SELFLM_PROGRESS_INTERVAL_S=str(PROGRESS_INTERVAL_S),
    )
    log = (tmp / "worker.log").open("w")
    with TestClient(create_app(settings)) as client:
        worker = subprocess.Popen(
            [sys.executable, "-m", "selflm.cli", "worker"],
            env=environ,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield {
                "client": client,
                "settings": settings,
                "db": Database(pg_module_db_url),
                "log": tmp / "worker.log",
            }
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
            log.close()


def wait_round(env: dict[str, Any], round_id: int, timeout: float = 300) -> dict[str, Any]:
    client: TestClient = env["client"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/update-rounds/{round_id}").json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(1)
    raise AssertionError(
        f"round {round_id} did not finish; worker log:\n{Path(env['log']).read_text()[-4000:]}"
    )


def start(env: dict[str, Any], params: dict[str, Any]) -> int:
    r = env["client"].post("/update-rounds", json=params)
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/update-rounds/{r.json()['id']}"
    return int(r.json()["id"])


def champion(env: dict[str, Any]) -> int:
    with env["db"].session() as s:
        v = s.scalar(select(Checkpoint.version).where(Checkpoint.status == "champion"))
    assert v is not None
    return int(v)


def test_round_runs_every_stage_and_is_promoted_when_better(env: dict[str, Any]) -> None:
    before = champion(env)
    rid = start(env, BETTER)
    body = wait_round(env, rid)
    assert body["status"] == "succeeded", body["error"]
    assert body["stage"] == "done" and body["progress"] == 1.0
    m = body["metrics"]
    for stage in ("generate", "select", "update", "evaluate", "meta_step", "decide"):
        assert m[stage]["seconds"] > 0, stage
    assert m["generate"]["generated"] == 12
    assert m["select"]["selected"] >= 2
    assert m["update"]["replay_token_fraction"] >= 0.5
    assert [e["step"] for e in m["update"]["train_loss"]] == [1, 2] or len(
        m["update"]["train_loss"]
    ) >= 1
    ev = m["evaluate"]
    assert ev["candidate_dev_ppl"] < ev["champion_dev_ppl"] * 0.995
    assert body["decision"] == "promoted", body["reason"]
    assert "dev ppl" in body["reason"]
    new = body["candidate_version"]
    assert new == before + 1 and champion(env) == new
    with env["db"].session() as s:
        row = s.scalars(select(Checkpoint).where(Checkpoint.version == new)).one()
        assert row.parent_version == before and row.produced_by_round == rid
        old = s.scalars(select(Checkpoint).where(Checkpoint.version == before)).one()
        assert old.status == "retired"
    assert Path(row.path, "manifest.json").is_file()

    report = env["client"].get("/metrics", headers={"accept": "application/json"}).json()
    assert report["champion_version"] == new
    assert [c["version"] for c in report["checkpoints"]][-1] == new
    mine = next(r for r in report["rounds"] if r["id"] == rid)
    assert mine["decision"] == "promoted"
    assert mine["metrics"]["candidate_dev_ppl"] == pytest.approx(ev["candidate_dev_ppl"])
    assert report["checkpoints"][-1]["metrics"]["test_ppl"] == pytest.approx(
        ev["candidate_test_ppl"]
    )


def test_round_that_does_not_beat_the_margin_is_rejected(env: dict[str, Any]) -> None:
    before = champion(env)
    rid = start(env, {**SMALL, "promotion_margin": 0.9})
    body = wait_round(env, rid)
    assert body["status"] == "succeeded", body["error"]
    assert body["decision"] == "rejected"
    ev = body["metrics"]["evaluate"]
    # The reason carries the numbers that decided it.
    assert f"{ev['champion_dev_ppl']:.4f}" in body["reason"]
    assert body["candidate_version"] is None
    assert champion(env) == before
    # Diversity is gated against the lineage base (v1) as well as the parent, on one fixed
    # probe whose numbers are cached per checkpoint: the parent's numbers are exactly what the
    # round that promoted it measured for its candidate.
    assert before > 1 and 0 < ev["base_distinct_2"] <= 1
    rounds = env["client"].get("/update-rounds", params={"limit": 100}).json()
    producer = next(r for r in rounds["items"] if r["candidate_version"] == before)
    prev = env["client"].get(f"/update-rounds/{producer['id']}").json()["metrics"]["evaluate"]
    for k in ("distinct_1", "distinct_2", "repetition_rate"):
        assert ev[f"champion_{k}"] == pytest.approx(prev[f"candidate_{k}"]), k
    cache = Path(env["settings"].checkpoint_dir, "default", "diversity.json")
    assert len(json.loads(cache.read_text())) >= 2  # the base and the current champion


def test_second_round_while_one_is_active_gets_409(env: dict[str, Any]) -> None:
    first = start(env, SMALL)
    r = env["client"].post("/update-rounds", json=SMALL)
    assert r.status_code == 409
    assert r.json()["error_type"] == "conflict" and str(first) in r.json()["error"]
    wait_round(env, first)


def test_duplicate_delivery_runs_the_round_once(env: dict[str, Any]) -> None:
    rid = start(env, SMALL)
    enqueue_round(make_client(env["settings"]), rid)  # the same message delivered again
    body = wait_round(env, rid)
    assert body["status"] == "succeeded" and body["attempts"] == 1
    time.sleep(3)  # give the duplicate time to be consumed
    with env["db"].session() as s:
        n = len(
            list(
                s.scalars(
                    select(RoundMetric).where(
                        RoundMetric.round_id == rid,
                        RoundMetric.stage == "generate",
                        RoundMetric.name == "tokens",
                    )
                )
            )
        )
    assert n == 1
    # And a direct re-run of a finished round does nothing.
    assert run_round(env["settings"], env["db"], rid) is None
    assert env["client"].get(f"/update-rounds/{rid}").json()["attempts"] == 1


def test_bad_round_parameters_are_rejected(env: dict[str, Any]) -> None:
    for bad in (
        {"strategy": "best"},
        {"train_size": 0},
        {"nope": 1},
        {"prompt_source": "file"},
        {"epsilon_grid": [0]},
    ):
        r = env["client"].post("/update-rounds", json=bad)
        assert r.status_code == 422, bad
        assert r.json()["error_type"] == "validation"
    assert env["client"].get("/update-rounds/999999").status_code == 404
    listing = env["client"].get("/update-rounds?limit=2").json()
    assert listing["limit"] == 2 and len(listing["items"]) <= 2
    ids = [i["id"] for i in listing["items"]]
    assert ids == sorted(ids, reverse=True)


# Enough optimizer steps that `update` spans several of the worker's progress writes (every
# PROGRESS_INTERVAL_S here): batch size 1 over real replay text (many windows), 3 epochs.
LONG_UPDATE = {
    **SMALL,
    "filters": False,
    "train_size": 8,
    "valid_size": 2,
    "replay_fraction": 0.8,
    "batch_size": 1,
    "epochs": 3,
    "promotion_margin": 0.9,  # rejected: this test is about progress, not the decision
}


def test_progress_moves_inside_the_update_stage(env: dict[str, Any]) -> None:
    client: TestClient = env["client"]
    rid = start(env, LONG_UPDATE)
    polls: list[dict[str, Any]] = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        body = client.get(f"/update-rounds/{rid}").json()
        polls.append(body)
        if body["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert polls[-1]["status"] == "succeeded", polls[-1]["error"]

    # Overall progress never moves backwards, from the first poll to the last.
    overall = [b["progress"] for b in polls]
    assert overall == sorted(overall) and overall[-1] == 1.0

    # Inside `update`: the stage's own progress strictly increases from write to write,
    # counting optimizer steps of the planned total, with the running loss.
    inside = [b for b in polls if b["stage"] == "update" and 0 < b["stage_progress"] < 1]
    steps: list[float] = []
    for b in inside:
        if not steps or b["stage_progress"] != steps[-1]:
            steps.append(b["stage_progress"])
    assert len(steps) >= 2, [(b["stage"], b["stage_progress"]) for b in polls]
    assert all(a < b for a, b in itertools.pairwise(steps)), steps
    for b in inside:
        d = b["progress_detail"]
        assert d["unit"] == "steps" and 0 < d["done"] < d["total"], d
        assert d["loss"] > 0 and b["stage_progress"] == pytest.approx(d["done"] / d["total"])
        # The overall bar sits inside update's slice and has an estimate of what is left.
        assert 0.30 < b["progress"] < 0.60 and b["eta_s"] is not None and b["eta_s"] >= 0
    # Other stages report in their own units.
    units = {(b["stage"], (b["progress_detail"] or {}).get("unit")) for b in polls}
    assert ("update", "steps") in units
    assert polls[-1]["eta_s"] is None and polls[-1]["stage"] == "done"
