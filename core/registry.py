"""The checkpoint registry: every version's record, the champion pointer, and the four verbs.

* :func:`publish` — stage the files, hash them, take the next free version (never one a
  leftover directory holds), rename into place and insert the row; a failure anywhere
  leaves neither a directory nor a row behind.
* :func:`promote` — move the champion pointer under a per-lineage lock, then announce it.
  Concurrent promotions queue on the lock; one that still cannot proceed raises
  :class:`PromotionConflict` (the API answers 409), never a raw database error.
* :func:`open` — verify the files against the recorded manifest, then load them.
* :func:`ensure_base_checkpoint` — import the base model as version 1 on first start.

A checkpoint travels as one frozen :class:`CheckpointRef`. This module never imports torch
at module level (routes use it); :func:`open` and the base import load it lazily. The files
themselves are :mod:`core.store`'s job.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import func, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from core import store
from core.db.models import Checkpoint, UpdateRound, utcnow
from core.db.rounds import RoundCancelled, update_stmt
from core.db.session import Database
from core.notify import announce
from core.settings import Settings
from core.store import CheckpointError, checkpoint_path, read_manifest, verify_checkpoint

if TYPE_CHECKING:
    from core.modeling.loader import LoadedBase

__all__ = [
    "PROMOTABLE",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointRef",
    "NoChampionError",
    "PromotionConflict",
    "champion",
    "champion_version",
    "ensure_base_checkpoint",
    "get",
    "get_champion",
    "get_checkpoint",
    "lineage_root",
    "open",
    "promote",
    "publish",
    "set_champion",
]

log = logging.getLogger(__name__)

PROMOTABLE = ("retired", "candidate", "champion")
LOCK_TIMEOUT_S = 15
_ATTEMPTS = 4
# PostgreSQL: deadlock, serialization failure, lock_not_available (lock_timeout).
_CONTENTION_SQLSTATES = {"40P01", "40001", "55P03"}
T = TypeVar("T")


class NoChampionError(RuntimeError):
    """The lineage has no champion checkpoint yet."""


class CheckpointNotFoundError(LookupError):
    """No such version in the lineage."""


class PromotionConflict(RuntimeError):
    """The promotion cannot happen as asked: the version is not promotable, the champion
    moved under a round, or the lineage stayed locked by other writers."""


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint version, as recorded (a snapshot: re-read it to see later changes)."""

    lineage: str
    version: int
    path: Path
    manifest: dict[str, Any] = field(compare=False, repr=False)
    parent_version: int | None = None
    status: str = "candidate"
    source: str = ""
    produced_by_round: int | None = None

    @classmethod
    def of(cls, row: Checkpoint) -> CheckpointRef:
        return cls(
            lineage=row.lineage,
            version=row.version,
            path=Path(row.path),
            manifest=dict(row.manifest),
            parent_version=row.parent_version,
            status=row.status,
            source=row.source,
            produced_by_round=row.produced_by_round,
        )


# --------------------------------------------------------------------------- reading


def get_champion(s: Session, lineage: str) -> Checkpoint | None:
    return s.scalars(
        select(Checkpoint).where(Checkpoint.lineage == lineage, Checkpoint.status == "champion")
    ).one_or_none()


def get_checkpoint(s: Session, lineage: str, version: int) -> Checkpoint | None:
    return s.scalars(
        select(Checkpoint).where(Checkpoint.lineage == lineage, Checkpoint.version == version)
    ).one_or_none()


def champion(db: Database, lineage: str) -> CheckpointRef | None:
    with db.session() as s:
        row = get_champion(s, lineage)
        return CheckpointRef.of(row) if row is not None else None


def get(db: Database, lineage: str, version: int) -> CheckpointRef | None:
    with db.session() as s:
        row = get_checkpoint(s, lineage, version)
        return CheckpointRef.of(row) if row is not None else None


def lineage_root(db: Database, lineage: str) -> CheckpointRef | None:
    """The lineage's first version: the base every later version descends from."""
    with db.session() as s:
        row = s.scalars(
            select(Checkpoint)
            .where(Checkpoint.lineage == lineage)
            .order_by(Checkpoint.version)
            .limit(1)
        ).one_or_none()
        return CheckpointRef.of(row) if row is not None else None


def champion_version(db: Database, lineage: str) -> int | None:
    with db.session() as s:
        return s.scalar(
            select(Checkpoint.version).where(
                Checkpoint.lineage == lineage, Checkpoint.status == "champion"
            )
        )


# --------------------------------------------------------------------------- locking


def _lock_lineage(s: Session, lineage: str) -> None:
    """Serialise the lineage's writers until this transaction ends."""
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        s.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_S}s'"))
        s.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
            {"key": f"selflm.lineage.{lineage}"},
        )
    elif dialect == "sqlite":
        # A no-op write takes SQLite's write lock now (waiting up to busy_timeout), so the
        # reads that follow see the last committed state and no later write can fail on a
        # concurrent writer's commit.
        s.execute(text("UPDATE checkpoints SET status = status WHERE 0"))


def _contention(e: BaseException) -> bool:
    if isinstance(e, IntegrityError):
        return True  # a writer that bypassed the lock beat us to a version or the pointer
    if isinstance(e, DBAPIError):
        state = getattr(e.orig, "sqlstate", None) or getattr(e.orig, "pgcode", None)
        return state in _CONTENTION_SQLSTATES or "database is locked" in str(e.orig)
    return False


def _locked(db: Database, lineage: str, fn: Callable[[Session], T], what: str) -> T:
    """Run `fn` in one transaction holding the lineage lock; retry on contention."""
    for attempt in range(_ATTEMPTS):
        try:
            with db.session() as s:
                _lock_lineage(s, lineage)
                return fn(s)
        except DBAPIError as e:
            if not _contention(e):
                raise
            if attempt == _ATTEMPTS - 1:
                raise PromotionConflict(
                    f"{what} lost to concurrent writers on lineage {lineage!r}; retry"
                ) from e
            log.info("%s: contention (%s); retrying", what, type(e.orig).__name__)
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- writing


def set_champion(s: Session, lineage: str, version: int) -> Checkpoint:
    """Move the pointer in the caller's transaction (old champion → retired); no announce.

    The partial unique index rejects a second champion, so the old one is retired first.
    Prefer :func:`promote`, which locks, verifies and announces.
    """
    target = get_checkpoint(s, lineage, version)
    if target is None:
        raise CheckpointNotFoundError(f"checkpoint {lineage}/v{version} does not exist")
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


def _next_free_version(s: Session, lineage: str, lineage_dir: Path) -> int:
    recorded = s.scalar(select(func.max(Checkpoint.version)).where(Checkpoint.lineage == lineage))
    on_disk = store.versions_on_disk(lineage_dir)
    latest = max(int(recorded or 0), on_disk[-1] if on_disk else 0)
    if on_disk and on_disk[-1] > int(recorded or 0):
        log.warning("%s holds unrecorded v%d; numbering past it", lineage_dir, on_disk[-1])
    return latest + 1


def publish(
    db: Database,
    root: str | Path,
    lineage: str,
    model: Any,
    tokenizer: Any,
    *,
    parent_version: int | None,
    source: str,
    produced_by_round: int | None = None,
    status: str = "candidate",
    version: int | None = None,
) -> CheckpointRef:
    """Write, hash and record a new version (the next free one unless `version` is given).

    The files are staged first; the version is taken, the directory renamed into place and
    the row inserted under the lineage lock. If the row cannot be recorded the directory is
    taken back, so a failed publish leaves nothing behind. FileExistsError when an explicit
    `version` already has a directory.
    """
    lineage_dir = Path(root) / lineage
    staged = store.stage(model, tokenizer, lineage_dir)
    meta: dict[str, Any] = {"source": source}
    if parent_version is not None:
        meta["parent_version"] = parent_version
    try:
        for attempt in range(_ATTEMPTS):
            final: Path | None = None
            try:
                with db.session() as s:
                    _lock_lineage(s, lineage)
                    v = version or _next_free_version(s, lineage, lineage_dir)
                    final = checkpoint_path(root, lineage, v)
                    manifest = store.make_manifest(lineage, v, staged, **meta)
                    store.finalize(staged, final, manifest)
                    row = Checkpoint(
                        lineage=lineage,
                        version=v,
                        parent_version=parent_version,
                        path=str(final),
                        manifest=manifest,
                        status=status,
                        source=source,
                        produced_by_round=produced_by_round,
                        promoted_at=utcnow() if status == "champion" else None,
                    )
                    s.add(row)
                    s.flush()
                    ref = CheckpointRef.of(row)
                log.info("published %s/v%d (%s)", lineage, v, source)
                return ref
            except BaseException as e:
                if final is not None and final.exists() and not staged.dir.exists():
                    os.rename(final, staged.dir)  # not recorded: take the directory back
                retry = version is None and (
                    isinstance(e, FileExistsError) or (isinstance(e, DBAPIError) and _contention(e))
                )
                if not retry or attempt == _ATTEMPTS - 1:
                    raise
                log.info("publish %s: v%s taken meanwhile; retrying", lineage, final)
        raise AssertionError("unreachable")
    finally:
        if staged.dir.exists():
            store.discard(staged.dir)


def promote(
    db: Database,
    lineage: str,
    version: int,
    *,
    redis_url: str | None,
    verify: bool = True,
    expect_champion: int | None = None,
    round_id: int | None = None,
) -> CheckpointRef:
    """Make `version` the champion and announce it to the replicas.

    `verify` re-hashes the files first (never point replicas at a broken checkpoint).
    `expect_champion` refuses when the pointer has moved off that version; `round_id`
    refuses when that round was cancelled and records `version` as its candidate in the same
    transaction as the pointer move. Raises CheckpointNotFoundError, CheckpointError,
    PromotionConflict or RoundCancelled.
    """
    ref = get(db, lineage, version)
    if ref is None:
        raise CheckpointNotFoundError(f"checkpoint v{version} not found")
    if ref.status not in PROMOTABLE:
        raise PromotionConflict(f"checkpoint v{version} is {ref.status}; cannot promote")
    if verify:
        verify_checkpoint(ref.path, ref.manifest)

    def move(s: Session) -> CheckpointRef:
        if round_id is not None:
            status = s.scalar(select(UpdateRound.status).where(UpdateRound.id == round_id))
            if status == "cancelled":
                raise RoundCancelled(f"round {round_id} was cancelled before promotion")
        current = get_champion(s, lineage)
        if expect_champion is not None and (current is None or current.version != expect_champion):
            raise PromotionConflict(
                f"champion moved from v{expect_champion} to "
                f"v{current.version if current else None} during the round; not promoting"
            )
        row = set_champion(s, lineage, version)
        if round_id is not None:
            s.execute(update_stmt(round_id, candidate_version=version))
        return CheckpointRef.of(row)

    promoted = _locked(db, lineage, move, f"promotion of v{version}")
    announce(redis_url, lineage, version)
    log.info("promoted %s/v%d", lineage, version)
    return promoted


# --------------------------------------------------------------------------- loading


def open(ref: CheckpointRef, device: Any, dtype: Any, serving: bool = False) -> LoadedBase:
    """Load `ref`'s files, each checked against the manifest recorded in the database as it
    is read (BLAKE3, or sha256 for a version written before it); CheckpointError when one
    is missing or does not match. `serving`: an inference-only model where one exists
    (:func:`core.modeling.loader.load_checkpoint`)."""
    from core.modeling.loader import load_checkpoint

    return load_checkpoint(ref.path, device, dtype, ref.manifest, serving=serving)


# --------------------------------------------------------------------------- the base


def ensure_base_checkpoint(settings: Settings, db: Database) -> CheckpointRef:
    """Return the lineage's champion, importing the base model as version 1 on first start.

    A version-1 directory already on disk (a recreated database, a copied store) is reused
    when it verifies and holds the configured base model.
    """
    lineage = settings.lineage
    current = champion(db, lineage)
    if current is not None:
        return current
    if lineage_root(db, lineage) is not None:
        raise NoChampionError(
            f"lineage {lineage!r} has checkpoints but no champion; "
            "promote one with POST /checkpoints/{version}/promote"
        )
    path = checkpoint_path(settings.checkpoint_dir, lineage, 1)
    if not path.exists():
        from core.modeling.loader import load_base

        base = load_base(settings.base_model)
        try:
            ref = publish(
                db,
                settings.checkpoint_dir,
                lineage,
                base.model,
                base.tokenizer,
                parent_version=None,
                source=settings.base_model,
                status="champion",
                version=1,
            )
        except (FileExistsError, IntegrityError):
            # Another process (a second replica, the worker) wrote or recorded it first.
            ref = None
        if ref is not None:
            log.info("base model %s recorded as %s/v1", settings.base_model, lineage)
            return ref
    return _record_existing_base(settings, db, path)


def _record_existing_base(settings: Settings, db: Database, path: Path) -> CheckpointRef:
    manifest = verify_checkpoint(path) if path.exists() else read_manifest(path)
    if manifest.get("source") != settings.base_model:
        raise CheckpointError(
            f"{path} holds {manifest.get('source')!r}, not {settings.base_model!r}; "
            "point SELFLM_CHECKPOINT_DIR elsewhere or remove it"
        )
    lineage = settings.lineage

    def record(s: Session) -> CheckpointRef:
        existing = get_champion(s, lineage)
        if existing is not None:
            return CheckpointRef.of(existing)
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
        s.flush()
        return CheckpointRef.of(row)

    log.info("reusing base checkpoint at %s", path)
    return _locked(db, lineage, record, "recording the base model")
