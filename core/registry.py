"""Checkpoint records: the champion pointer, base-model import and promotion.

Routes and the worker both use these functions; none of them imports torch at module level
(importing the base model pulls in the loader lazily).
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db.models import Checkpoint, utcnow
from core.db.session import Database
from core.settings import Settings
from core.store import (
    CheckpointError,
    checkpoint_path,
    read_manifest,
    verify_checkpoint,
)

log = logging.getLogger(__name__)


class NoChampionError(RuntimeError):
    """The lineage has no champion checkpoint yet."""


def get_champion(s: Session, lineage: str) -> Checkpoint | None:
    return s.scalars(
        select(Checkpoint).where(Checkpoint.lineage == lineage, Checkpoint.status == "champion")
    ).one_or_none()


def get_checkpoint(s: Session, lineage: str, version: int) -> Checkpoint | None:
    return s.scalars(
        select(Checkpoint).where(Checkpoint.lineage == lineage, Checkpoint.version == version)
    ).one_or_none()


def next_version(s: Session, lineage: str) -> int:
    current = s.scalar(select(func.max(Checkpoint.version)).where(Checkpoint.lineage == lineage))
    return int(current or 0) + 1


def champion_version(db: Database, lineage: str) -> int | None:
    with db.session() as s:
        return s.scalar(
            select(Checkpoint.version).where(
                Checkpoint.lineage == lineage, Checkpoint.status == "champion"
            )
        )


def promote(s: Session, lineage: str, version: int) -> Checkpoint:
    """Make `version` the champion in the caller's transaction (old champion → retired).

    The partial unique index rejects a second champion, so the old one is retired first.
    """
    target = get_checkpoint(s, lineage, version)
    if target is None:
        raise LookupError(f"checkpoint {lineage}/v{version} does not exist")
    s.execute(
        update(Checkpoint)
        .where(
            Checkpoint.lineage == lineage,
            Checkpoint.status == "champion",
            Checkpoint.version != version,
        )
        .values(status="retired")
    )
    target.status = "champion"
    target.promoted_at = utcnow()
    s.flush()
    return target


def ensure_base_checkpoint(settings: Settings, db: Database) -> Checkpoint:
    """Return the lineage's champion, importing the base model as version 1 on first start."""
    lineage = settings.lineage
    with db.session() as s:
        champ = get_champion(s, lineage)
        if champ is not None:
            return champ
        if next_version(s, lineage) != 1:
            raise NoChampionError(
                f"lineage {lineage!r} has checkpoints but no champion; "
                "promote one with POST /checkpoints/{version}/promote"
            )
    path = checkpoint_path(settings.checkpoint_dir, lineage, 1)
    manifest = _import_or_reuse(settings, path)
    try:
        with db.session() as s:
            row = Checkpoint(
                lineage=lineage,
                version=1,
                parent_version=None,
                path=str(path),
                manifest=manifest,
                status="champion",
                source=str(manifest.get("source", settings.base_model)),
                promoted_at=utcnow(),
            )
            s.add(row)
        log.info("base model %s recorded as %s/v1", settings.base_model, lineage)
        return row
    except IntegrityError:
        # Another process (a second replica, the worker) recorded it first.
        with db.session() as s:
            champ = get_champion(s, lineage)
            if champ is None:
                raise
            return champ


def _import_or_reuse(settings: Settings, path: Path) -> dict[str, object]:
    if path.exists():
        try:
            manifest = verify_checkpoint(path)
            if manifest.get("source") == settings.base_model:
                log.info("reusing base checkpoint at %s", path)
                return manifest
            raise CheckpointError(
                f"{path} holds {manifest.get('source')!r}, not {settings.base_model!r}; "
                "point SELFLM_CHECKPOINT_DIR elsewhere or remove it"
            )
        except CheckpointError:
            raise
    from core.modeling.loader import load_base
    from core.store import write_checkpoint

    base = load_base(settings.base_model)
    try:
        stored = write_checkpoint(
            base.model,
            base.tokenizer,
            settings.checkpoint_dir,
            settings.lineage,
            1,
            source=settings.base_model,
        )
    except OSError:
        if not path.exists():
            raise
        return read_manifest(path)  # lost a race with another writer: theirs is identical
    return stored.manifest
