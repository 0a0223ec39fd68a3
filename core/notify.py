"""Champion-change announcements over Redis pub/sub (optional; replicas also poll the DB)."""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)


def channel(lineage: str) -> str:
    return f"selflm:champion:{lineage}"


def announce(redis_url: str | None, lineage: str, version: int, timeout_s: float = 3.0) -> bool:
    """Publish the new champion; a failure only delays replicas until their next poll.

    Bounded by `timeout_s` (connect and reply): a blackholed Redis must not hang a promote.
    """
    if not redis_url:
        return False
    try:
        import redis

        client = redis.Redis.from_url(
            redis_url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
        )
        try:
            client.publish(channel(lineage), json.dumps({"lineage": lineage, "version": version}))
        finally:
            client.close()
        return True
    except Exception:
        log.warning(
            "could not announce v%d on %s; replicas will poll", version, redis_url, exc_info=True
        )
        return False
