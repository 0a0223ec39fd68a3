"""Promotion of a round's candidate: write it, record it and move the champion pointer."""

from __future__ import annotations

import logging
from typing import Any

from core.db import rounds as records
from core.db.models import Checkpoint
from core.db.session import Database
from core.notify import announce
from core.registry import get_champion, next_version, promote
from core.settings import Settings
from core.store import write_checkpoint

log = logging.getLogger(__name__)


def promote_candidate(
    settings: Settings, db: Database, round_id: int, candidate: Any, tok: Any, parent: int
) -> tuple[int, dict[str, Any]]:
    """Write atomically, record, move the champion pointer in one transaction, announce.

    Returns the new version and its manifest.
    """
    lineage = settings.lineage
    with db.session() as s:
        version = next_version(s, lineage)
    stored = write_checkpoint(
        candidate,
        tok,
        settings.checkpoint_dir,
        lineage,
        version,
        source=f"round {round_id}",
        parent_version=parent,
    )
    with db.session() as s:
        if records.is_cancelled(db, round_id):
            raise records.RoundCancelled(f"round {round_id} was cancelled before promotion")
        current = get_champion(s, lineage)
        if current is None or current.version != parent:
            raise RuntimeError(
                f"champion moved from v{parent} to "
                f"v{current.version if current else None} during the round; not promoting"
            )
        s.add(
            Checkpoint(
                lineage=lineage,
                version=version,
                parent_version=parent,
                path=str(stored.path),
                manifest=stored.manifest,
                status="candidate",
                source=f"round {round_id}",
                produced_by_round=round_id,
            )
        )
        s.flush()
        promote(s, lineage, version)
        # The round records its candidate in the same transaction as the promotion.
        s.execute(records.update_stmt(round_id, candidate_version=version))
    announce(settings.redis_url, lineage, version)
    log.info("round %d promoted v%d (parent v%d)", round_id, version, parent)
    return version, stored.manifest
