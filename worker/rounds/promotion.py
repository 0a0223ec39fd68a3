"""Promotion of a round's candidate: publish it, then move the champion pointer."""

from __future__ import annotations

import logging
from typing import Any

from core import registry
from core.db import rounds as records
from core.db.session import Database
from core.registry import CheckpointRef
from core.settings import Settings

log = logging.getLogger(__name__)


def promote_candidate(
    settings: Settings,
    db: Database,
    round_id: int,
    candidate: Any,
    tok: Any,
    parent: CheckpointRef,
) -> CheckpointRef:
    """Publish the candidate as the next version, then promote it if the round is still live
    and `parent` is still the champion (both checked under the lineage lock, in the
    transaction that moves the pointer and records the round's candidate).

    When the promotion is refused (cancelled, champion moved) the published version stays
    recorded as a ``candidate``: its files are whole and it can be promoted by hand.
    """
    if records.is_cancelled(db, round_id):  # before spending a write on it
        raise records.RoundCancelled(f"round {round_id} was cancelled before promotion")
    lineage = settings.lineage
    ref = registry.publish(
        db,
        settings.checkpoint_dir,
        lineage,
        candidate,
        tok,
        parent_version=parent.version,
        source=f"round {round_id}",
        produced_by_round=round_id,
    )
    promoted = registry.promote(
        db,
        lineage,
        ref.version,
        redis_url=settings.redis_url,
        verify=False,  # publish hashed these very files a moment ago
        expect_champion=parent.version,
        round_id=round_id,
    )
    log.info("round %d promoted v%d (parent v%d)", round_id, promoted.version, parent.version)
    return promoted
