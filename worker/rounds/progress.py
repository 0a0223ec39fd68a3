"""A round's progress bar and its stage context: timing, progress, cancellation, metrics.

Each stage owns a slice of the overall bar (:data:`SLICES`). Inside a stage the work reports
``done`` of ``total`` units as it goes; :class:`Progress` turns that into the stage's own
progress and the overall progress and writes both to the round row at most once per
``min_interval_s`` (and always at stage boundaries), so a token or a training step costs a
clock read, not a database write. Overall progress only ever moves forward.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from core import metric_names as mn
from core.db import rounds as records
from core.db.session import Database
from worker.rounds.peak_rss import PeakRss

log = logging.getLogger(__name__)

# Stage → (start, end) of its slice of the overall progress bar.
SLICES: dict[str, tuple[float, float]] = {
    mn.GENERATE: (0.0, 0.25),
    mn.SELECT: (0.25, 0.30),
    mn.UPDATE: (0.30, 0.60),
    mn.EVALUATE: (0.60, 0.75),
    mn.META_STEP: (0.75, 0.90),
    mn.DECIDE: (0.90, 1.0),
}

Detail = Callable[[], dict[str, Any]]
R = TypeVar("R", bound="HasMetrics")


class HasMetrics(Protocol):
    def metrics(self) -> dict[str, float]: ...


class Tick(Protocol):
    """What a stage's work calls as it goes: ``tick(done, total, unit, extra)``.

    ``extra`` (say, the running loss) is only evaluated when the call is actually written.
    """

    def __call__(
        self, done: float, total: float, unit: str, extra: Detail | None = None
    ) -> None: ...


class Progress:
    """The round row's progress fields, written at a bounded rate."""

    def __init__(
        self,
        db: Database,
        round_id: int,
        min_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db, self.round_id = db, round_id
        self.min_interval_s, self.clock = min_interval_s, clock
        self.stage: str | None = None
        self.stage_progress = 0.0
        self.overall = 0.0
        self.detail: dict[str, Any] | None = None
        self._last_write = -float("inf")
        self.writes = 0

    def begin(self, stage: str) -> None:
        self.stage, self.stage_progress, self.detail = stage, 0.0, None
        self.overall = max(self.overall, SLICES[stage][0])
        records.enter_stage(self.db, self.round_id, stage, self.overall)
        self._last_write = self.clock()
        self.writes += 1

    def tick(self, done: float, total: float, unit: str, extra: Detail | None = None) -> None:
        if self.stage is None or total <= 0:
            return
        fraction = min(1.0, done / total)
        if fraction <= self.stage_progress:  # nothing new (and never backwards)
            return
        if self.clock() - self._last_write < self.min_interval_s:
            return
        detail: dict[str, Any] = {"done": done, "total": total, "unit": unit}
        if extra is not None:
            detail.update(extra())
        self._set(fraction, detail)

    def end(self) -> None:
        """The stage is done: its own progress is 1 and the bar reaches its slice's end."""
        self._set(1.0, self.detail)

    def _set(self, stage_progress: float, detail: dict[str, Any] | None) -> None:
        assert self.stage is not None
        start, end = SLICES[self.stage]
        self.stage_progress = max(self.stage_progress, stage_progress)
        self.overall = max(self.overall, start + (end - start) * self.stage_progress)
        self.detail = detail
        self._last_write = self.clock()
        self.writes += 1
        try:
            records.write_progress(
                self.db, self.round_id, self.stage_progress, self.overall, detail
            )
        except Exception:  # progress is for people watching; the round goes on without it
            log.warning("round %d: could not record progress", self.round_id, exc_info=True)


class Stage:
    """The handle a ``with round.stage(name)`` block works with."""

    def __init__(self, name: str, db: Database, round_id: int, progress: Progress) -> None:
        self.name, self._db, self._id = name, db, round_id
        self.tick: Tick = progress.tick

    def record(
        self, values: dict[str, float], step: int | None = None, stage: str | None = None
    ) -> None:
        """Store metrics now (under this stage unless `stage` says otherwise)."""
        if values:
            records.add_metrics(self._db, self._id, stage or self.name, values, step)

    def result(self, result: R) -> R:
        """Store a stage result's metrics under this stage and hand the result back."""
        self.record(result.metrics())
        return result


@contextmanager
def stage(
    db: Database,
    round_id: int,
    name: str,
    progress: Progress,
    timings: dict[str, float],
    peaks: dict[str, int] | None = None,
    rss: PeakRss | None = None,
) -> Iterator[Stage]:
    """Check for cancellation, open the stage's slice of the bar, time it, record its
    ``seconds`` and its ``memory`` (the process's peak RSS during the stage, also kept in
    ``peaks``) and close the slice. A stage that raises records nothing more."""
    if records.is_cancelled(db, round_id):
        raise records.RoundCancelled(f"round {round_id} was cancelled")
    log.info("round %d: %s", round_id, name)
    progress.begin(name)
    rss = rss or PeakRss()
    rss.reset()
    started = time.perf_counter()
    yield Stage(name, db, round_id, progress)
    seconds = time.perf_counter() - started
    timings[name] = seconds
    values = {mn.SECONDS: seconds}
    peak = rss.read()
    if peak is not None:
        values[mn.MEMORY] = float(peak)
        if peaks is not None:
            peaks[name] = peak
    records.add_metrics(db, round_id, name, values)
    progress.end()
