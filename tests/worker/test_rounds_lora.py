"""LoRA rounds through the real pipeline: the HTTP app stores the round (real PostgreSQL, the
message on real Redis), ``run_round`` — what the Celery task runs — runs it on tiny:llama, and
the promoted checkpoint is a plain merged Hugging Face directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from sqlalchemy import select

from app.main import create_app
from core.db.models import Checkpoint
from core.db.session import Database, upgrade
from core.settings import Settings
from worker.rounds.lora import LoraTargetError
from worker.rounds.pipeline import run_round

REDIS = os.environ.get("SELFLM_TEST_REDIS_URL", "redis://127.0.0.1:6379")
DB_INDEX = 13

SMALL: dict[str, Any] = {
    "num_prompts": 4,
    "samples_per_prompt": 3,
    "max_new_tokens": 16,
    "min_words": 3,
    "train_size": 6,
    "valid_size": 3,
    "eval_passages": 6,
    "diversity_prompts": 3,
    "batch_size": 4,
    "max_length": 48,
}
# As tests/worker/test_rounds_e2e.py's BETTER: real replay text at a high rate teaches the
# random-init model the domain, so the adapter's candidate is genuinely better and promoted.
LORA_BETTER = {
    **SMALL,
    "update_method": "lora",
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"],
    "replay_fraction": 0.8,
    "learning_rate": 1e-2,
    "epochs": 2,
    "promotion_margin": 0.0,
    "diversity_tolerance": 1.0,
    "base_diversity_tolerance": 1.0,
}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, pg_module_db_url: str) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("lora-rounds")
    broker = f"{REDIS}/{DB_INDEX}"
    redis.Redis.from_url(broker).flushdb()
    settings = Settings(
        database_url=pg_module_db_url,
        broker_url=broker,
        redis_url=broker,
        checkpoint_dir=str(tmp / "checkpoints"),
        base_model="tiny:llama",
        embedded_worker=False,
    )
    upgrade(settings.database_url)
    db = Database(pg_module_db_url)
    try:
        with TestClient(create_app(settings)) as client:
            yield client, settings, db
    finally:
        db.dispose()
        redis.Redis.from_url(broker).flushdb()


def _start(client: TestClient, params: dict[str, Any]) -> int:
    r = client.post("/update-rounds", json=params)
    assert r.status_code == 202, r.text
    return int(r.json()["id"])


def _champion(db: Database) -> Checkpoint:
    with db.session() as s:
        return s.scalars(select(Checkpoint).where(Checkpoint.status == "champion")).one()


# In a fresh interpreter with peft made unimportable: the serving loader must not need it.
LOAD_WITHOUT_PEFT = textwrap.dedent(
    """
    import sys
    sys.modules["peft"] = None  # any `import peft` now raises ImportError
    from pathlib import Path
    import torch
    from core.modeling.loader import load_checkpoint
    from core.store import verify_checkpoint
    path = Path(sys.argv[1])
    verify_checkpoint(path)
    loaded = load_checkpoint(path, torch.device("cpu"), torch.float32)
    print(type(loaded.model).__name__)
    """
)


def test_lora_round_promotes_a_plain_merged_checkpoint(env: Any) -> None:
    client, settings, db = env
    parent = _champion(db)
    rid = _start(client, LORA_BETTER)
    # The stored params are echoed as sent.
    echoed = client.get(f"/update-rounds/{rid}").json()["params"]
    for key in ("update_method", "lora_rank", "lora_alpha", "lora_target_modules"):
        assert echoed[key] == LORA_BETTER[key], key

    outcome = run_round(settings, db, rid)
    assert outcome is not None
    body = client.get(f"/update-rounds/{rid}").json()
    assert body["status"] == "succeeded", body["error"]
    assert body["decision"] == "promoted", body["reason"]
    ev = body["metrics"]["evaluate"]
    assert ev["candidate_dev_ppl"] < ev["champion_dev_ppl"]
    new = _champion(db)
    assert new.version == body["candidate_version"] == parent.version + 1
    assert new.parent_version == parent.version and new.produced_by_round == rid

    path = Path(new.path)
    files = {p.name for p in path.iterdir()}
    assert "config.json" in files and "model.safetensors" in files
    assert not any(name.startswith("adapter_") for name in files), files
    config = json.loads((path / "config.json").read_text())
    assert "peft" not in json.dumps(config).lower()

    weights = load_file(str(path / "model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in weights)
    old = load_file(str(Path(parent.path) / "model.safetensors"))
    assert weights.keys() == old.keys()
    changed = {k for k in weights if not torch.equal(weights[k], old[k])}
    # The adapter moved exactly the weights it adapted (its ε may scale them, not spread).
    targets = ("q_proj.weight", "v_proj.weight", "up_proj.weight", "down_proj.weight")
    assert changed and all(k.endswith(targets) for k in changed), sorted(changed)[:5]

    out = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PEFT, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("LlamaForCausalLM")


def test_lora_targets_the_model_lacks_fail_the_round_clearly(env: Any) -> None:
    client, settings, db = env
    before = _champion(db).version
    rid = _start(client, {**SMALL, "update_method": "lora", "lora_target_modules": ["c_attn"]})
    with pytest.raises(LoraTargetError):
        run_round(settings, db, rid)
    body = client.get(f"/update-rounds/{rid}").json()
    assert body["status"] == "failed"
    assert "LoRA target module 'c_attn' matches no module of this model" in body["error"]
    assert "q_proj" in body["error"]  # and says what would fit
    assert "generate" not in body["metrics"]  # failed before spending a stage on it
    assert _champion(db).version == before


def test_malformed_lora_params_get_422(env: Any) -> None:
    client = env[0]
    for bad in (
        {"update_method": "qlora"},
        {"update_method": "lora", "lora_rank": 0},
        {"update_method": "lora", "lora_target_modules": ["q proj"]},
        {"update_method": "lora", "lora_target_modules": []},
        {"lora_target_modules": ["q_proj"]},
    ):
        r = client.post("/update-rounds", json=bad)
        assert r.status_code == 422, bad
        assert r.json()["error_type"] == "validation"


def test_full_round_is_unchanged(env: Any) -> None:
    client, settings, db = env
    rid = _start(client, {**SMALL, "promotion_margin": 0.9})
    assert client.get(f"/update-rounds/{rid}").json()["params"]["update_method"] == "full"
    run_round(settings, db, rid)
    body = client.get(f"/update-rounds/{rid}").json()
    assert body["status"] == "succeeded", body["error"]
    assert body["decision"] == "rejected"
    # A full round never imports peft: run one stage-free check in a fresh interpreter.
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, worker.rounds.pipeline, app.main; print('peft' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
