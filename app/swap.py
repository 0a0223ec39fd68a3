"""Swap watcher: follow the champion pointer and hot-swap the engine's model.

A replica hears about a new champion from Redis pub/sub (when SELFLM_REDIS_URL is set) and,
whatever happens to those messages, from polling the database every `poll_interval_s`. The
new checkpoint is verified and loaded in this background thread while the old model keeps
serving; the engine then swaps its reference between batches. A checkpoint that is missing,
fails its checksum or fails to load is refused: the old version keeps serving and /health
reports the error.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import UTC, datetime
from typing import Any

from app.engine.interface import Engine
from core import registry
from core.db.session import Database
from core.notify import channel
from core.registry import CheckpointRef
from core.settings import Settings

log = logging.getLogger(__name__)

RETRY_REFUSED_S = 60.0  # a refused version is retried this often (it may have been repaired)


class SwapWatcher:
    def __init__(self, settings: Settings, db: Database, engine: Engine) -> None:
        self.settings, self.db, self.engine = settings, db, engine
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.wanted_version: int | None = None
        self.error: str | None = None
        self.refused: dict[int, float] = {}  # version → when refused
        self.refused_total = 0
        self.swaps_total = 0
        self.loading: int | None = None
        self.last_swap_at: datetime | None = None
        self.last_swap_seconds: float | None = None
        self._threads = [threading.Thread(target=self._poll_loop, name="swap-poll", daemon=True)]
        if settings.redis_url:
            self._threads.append(
                threading.Thread(target=self._listen, name="swap-pubsub", daemon=True)
            )

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=10)

    def poke(self) -> None:
        """Check the champion pointer now (a message arrived, or a route promoted)."""
        self._wake.set()

    def status(self) -> dict[str, Any]:
        info = self.engine.info()
        with self._lock:
            return {
                "serving_version": info.version if info else None,
                "wanted_version": self.wanted_version,
                "loading_version": self.loading,
                "error": self.error,
                "refused_total": self.refused_total,
                "swaps_total": self.swaps_total,
                "last_swap_at": self.last_swap_at.isoformat() if self.last_swap_at else None,
                "last_swap_seconds": self.last_swap_seconds,
            }

    # -- threads ---------------------------------------------------------------------
    def _poll_loop(self) -> None:
        lower_thread_priority(self.settings.swap_nice)
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:
                log.warning("champion check failed", exc_info=True)
            self._wake.wait(self.settings.poll_interval_s)
            self._wake.clear()

    def _listen(self) -> None:
        import redis

        assert self.settings.redis_url is not None
        while not self._stop.is_set():
            try:
                client = redis.Redis.from_url(self.settings.redis_url, socket_timeout=5)
                pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call, unused-ignore]
                pubsub.subscribe(channel(self.settings.lineage))
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=1.0)
                    if msg is not None:
                        log.info("champion announcement: %s", msg.get("data"))
                        self.poke()
                pubsub.close()
                client.close()
            except Exception as e:
                # Redis down: polling still catches every promotion, just later.
                log.debug("pub/sub unavailable (%s); retrying", e)
                self._stop.wait(5.0)

    # -- the swap --------------------------------------------------------------------
    def _champion(self) -> CheckpointRef | None:
        return registry.champion(self.db, self.settings.lineage)

    def check(self) -> None:
        target = self._champion()
        if target is None:
            return
        info = self.engine.info()
        with self._lock:
            self.wanted_version = target.version
        if info is not None and info.version == target.version:
            with self._lock:
                self.error = None
            return
        refused_at = self.refused.get(target.version)
        if refused_at is not None and time.monotonic() - refused_at < RETRY_REFUSED_S:
            return
        self._load_and_swap(target)

    def _load_and_swap(self, target: CheckpointRef) -> None:
        with self._lock:
            self.loading = target.version
        started = time.monotonic()
        try:
            loaded = self.engine.load(target)
        except Exception as e:
            with self._lock:
                self.error = f"refused v{target.version}: {type(e).__name__}: {e}"
                self.refused[target.version] = time.monotonic()
                self.refused_total += 1
                self.loading = None
            log.error("%s; still serving the previous version", self.error)
            return
        # A newer announcement while loading supersedes this one: swap only to the latest.
        latest = self._champion()
        if latest is not None and latest.version != target.version:
            log.info("v%d superseded by v%d while loading", target.version, latest.version)
            del loaded
            with self._lock:
                self.loading = None
            self.poke()
            return
        self.engine.swap(loaded)
        # The old model is freed by reference counting once the batch that holds it is done
        # (the loaded model has no reference cycles). No gc.collect() here: a full collection
        # walks every object in the process holding the GIL (~0.4 s here), stalling decoding.
        del loaded
        with self._lock:
            self.loading = None
            self.error = None
            self.swaps_total += 1
            self.last_swap_at = datetime.now(UTC)
            self.last_swap_seconds = time.monotonic() - started
            self.refused.pop(target.version, None)
        log.info("swapped to v%d in %.2fs", target.version, self.last_swap_seconds)


def lower_thread_priority(nice: int) -> None:
    """Let the serving threads win the CPU while this thread verifies and loads (the swap
    watcher's thread; a manual promotion's verification, app/routes/checkpoints.py).

    On Linux scheduling is per thread: nice 19 (`SELFLM_SWAP_NICE`'s default) gives this
    one ~1.5% of a contended CPU
    against a normal thread, and torch's intra-op threads are per thread too, so a dtype
    conversion here runs on one core instead of spreading over the decoder's. (SCHED_IDLE
    would starve the swap outright on a busy machine: the watcher must still get through.)
    The load itself is GIL-free reads and hashing (core.store.CheckedReader).
    """
    import torch

    # This thread's OpenMP/MKL threads. It also lowers torch's global default, which any
    # thread takes when it first runs an op: the decoding thread sets its own (batcher.py).
    torch.set_num_threads(1)
    try:
        tid = threading.get_native_id()
        # Never above the thread's own: a process an operator niced more stays so (root could
        # otherwise raise the swap thread over the serving ones).
        os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        log.debug("could not lower the swap thread's priority", exc_info=True)
