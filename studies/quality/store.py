"""The quality study's stores: one SQLite database and checkpoint directory per arm."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LINEAGE = "default"
log = logging.getLogger("studies.quality")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def _settings(root: Path, base_model: str, device: str) -> Any:
    from core.settings import Settings

    values: dict[str, Any] = {
        "database_url": f"sqlite:///{root / 'selflm.db'}",
        "checkpoint_dir": str(root / "checkpoints"),
        "base_model": base_model,
        "lineage": LINEAGE,
        "device": device,  # validated: auto | cpu | cuda
        "redis_url": None,
        "embedded_worker": False,
    }
    return Settings(**values)


def prepare_base(root: Path, base_model: str, device: str) -> Path:
    """Import the base model once (the GGUF dequantisation is slow); arms copy its v1."""
    from core.db.session import Database, upgrade
    from core.registry import ensure_base_checkpoint

    settings = _settings(root, base_model, device)
    upgrade(settings.database_url)
    db = Database(settings.database_url)
    try:
        row = ensure_base_checkpoint(settings, db)
        return Path(row.path)
    finally:
        db.dispose()


def open_arm_store(
    root: Path, base_dir: Path, base_model: str, device: str, fresh: bool
) -> tuple[Any, Any]:
    from core.db.session import Database, upgrade
    from core.registry import ensure_base_checkpoint
    from core.store import checkpoint_path

    if fresh and root.exists():
        shutil.rmtree(root)
    settings = _settings(root, base_model, device)
    v1 = checkpoint_path(settings.checkpoint_dir, LINEAGE, 1)
    if not v1.exists():
        v1.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(base_dir, v1)
    upgrade(settings.database_url)
    db = Database(settings.database_url)
    ensure_base_checkpoint(settings, db)  # reuses the copied directory: verify + record
    return settings, db


def finished_rounds(db: Any) -> list[Any]:
    """The store's finished rounds in order; rounds an interrupted run left open are closed
    first (as promoted when their promotion had committed, else cancelled)."""
    from core.db import rounds as records

    rows, _ = records.list_rounds(db, LINEAGE, limit=100000, offset=0)
    rows.reverse()
    for row in rows:
        if row.status in records.ACTIVE:
            if row.candidate_version is not None:
                log.warning("round %d: interrupted after its promotion; keeping it", row.id)
                records.finish(db, row.id, "succeeded", decision="promoted", stage="done")
            else:
                log.warning("round %d: interrupted; cancelling it and running it again", row.id)
                records.finish(db, row.id, "cancelled", error="quality study interrupted")
    rows, _ = records.list_rounds(db, LINEAGE, limit=100000, offset=0)
    rows.reverse()
    return [r for r in rows if r.status in ("succeeded", "failed")]


def champion_after(db: Any, rows: Sequence[Any]) -> tuple[int, Path, dict[str, Any]]:
    """The champion once ``rows`` (finished rounds, in order) have run: the last promoted
    candidate, else v1. Derived from the rounds, not the live pointer, so a resumed run
    measures round i's champion even if later rounds already ran."""
    from core.registry import get_checkpoint

    version = 1
    for row in rows:
        if row.decision == "promoted" and row.candidate_version is not None:
            version = row.candidate_version
    with db.session() as s:
        c = get_checkpoint(s, LINEAGE, version)
        if c is None:
            raise RuntimeError(f"checkpoint v{version} is missing from the arm's store")
        return c.version, Path(c.path), dict(c.manifest)


def round_summary(row: Any) -> dict[str, Any]:
    """The round's own numbers (dev gate, ε, selection, timings) from its metrics."""
    from core.db import rounds as records

    flat: dict[str, float] = {}
    for stage, values in records.metrics_dict(row).items():
        for name, value in values.items():
            if not isinstance(value, list):
                flat[f"{stage}.{name}"] = value
    ev = {k.removeprefix("evaluate."): v for k, v in flat.items() if k.startswith("evaluate.")}
    return {
        "round_id": row.id,
        "status": row.status,
        "decision": row.decision,
        "promoted": row.decision == "promoted",
        "reason": row.reason,
        "error": row.error,
        # The ε the decision was about (the decide stage may step back from the meta-step's).
        "epsilon": flat.get("decide.epsilon", flat.get("meta_step.epsilon_chosen")),
        "champion_dev_ppl": ev.get("champion_dev_ppl"),
        "candidate_dev_ppl": ev.get("candidate_dev_ppl"),
        "champion_valid_ppl": ev.get("champion_valid_ppl"),
        "candidate_valid_ppl": ev.get("candidate_valid_ppl"),
        "round_test_ppl_champion": ev.get("champion_test_ppl"),
        "round_test_ppl_candidate": ev.get("candidate_test_ppl"),
        "improvement": flat.get("decide.improvement"),
        "round_seconds": flat.get("round.seconds"),
        "round_metrics": flat,
    }
