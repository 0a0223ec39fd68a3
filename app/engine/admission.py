"""Admission control for the serving engine: shed load early, with an honest Retry-After.

A request is refused before any work (tokenizing included) when the queue is full, or when
the wait it would face, estimated from the queue depth and the rate the engine serves at
(measured on the rows it finished), is longer than the server's `max_queue_wait_s` or the
request's own deadline. Retry-After is the time the queue needs to drain to where the
request would fit.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque

from app.engine.interface import (
    EngineDeadlineError,
    EngineOverloadedError,
    EngineValidationError,
    RequestCancelledError,
)
from app.limits import RequestContext
from core.modeling.decode import RowCancelledError, RowDeadlineError

# The Retry-After we send is kept in this range (seconds).
MIN_RETRY_S, MAX_RETRY_S = 1, 600


class ServiceMeter:
    """How many requests per second the engine completes with every slot busy: `slots`
    rows decode side by side, each taking the mean time the last `window` rows took from
    start to finish.

    Rows, not completions per second: a burst after a quiet spell, or after requests that
    came one at a time, is not judged by the rate of a half-empty batch. When the batch is
    full and each step slows down, the rows take longer and the estimate follows.
    Thread-safe (the batcher records, the event loop reads).
    """

    def __init__(self, slots: int, window: int = 64) -> None:
        self.slots = slots
        self._seconds: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()

    def record(self, seconds: float) -> None:
        with self._lock:
            self._seconds.append(seconds)

    def rate(self) -> float | None:
        """Requests per second, or None before the first request finished."""
        with self._lock:
            if not self._seconds:
                return None
            mean = sum(self._seconds) / len(self._seconds)
        return self.slots / max(mean, 1e-3)


def retry_after(excess: float, rate: float | None) -> int:
    """Seconds for `excess` queued requests to drain at `rate` (1 when unmeasured)."""
    if rate is None or rate <= 0:
        return MIN_RETRY_S
    return max(MIN_RETRY_S, min(MAX_RETRY_S, math.ceil(excess / rate)))


def check_admission(
    depth: int, max_queue: int, max_wait_s: float, rate: float | None, budget_s: float | None
) -> None:
    """Raise EngineOverloadedError if a request arriving behind `depth` queued ones should
    be shed; `budget_s` is what is left of its own deadline (None: no deadline)."""
    if depth >= max_queue:
        raise EngineOverloadedError(
            f"Model is overloaded: {depth} requests queued (limit {max_queue})",
            retry_after(depth - max_queue + 1, rate),
        )
    if rate is None:
        return
    wait = depth / rate
    if wait > max_wait_s:
        raise EngineOverloadedError(
            f"Model is overloaded: the estimated wait is {wait:.0f}s (limit {max_wait_s:g}s)",
            retry_after(depth - max_wait_s * rate, rate),
        )
    if budget_s is not None and wait > budget_s:
        raise EngineOverloadedError(
            f"Model is overloaded: the estimated wait of {wait:.0f}s is longer than the "
            f"request's deadline ({budget_s:.1f}s left)",
            retry_after(depth - budget_s * rate, rate),
        )


def deadline(timeout_s: float, header: str | None) -> float | None:
    """The request's deadline (time.monotonic()): the server's `timeout_s` (0: none),
    shortened by the client's `X-Request-Timeout` header (seconds) if it asks for less."""
    limits: list[float] = [timeout_s] if timeout_s > 0 else []
    if header is not None:
        try:
            asked = float(header)
        except ValueError:
            asked = math.nan
        if not (math.isfinite(asked) and asked > 0):
            raise EngineValidationError(
                f"`X-Request-Timeout` must be a positive number of seconds. Given: {header!r}"
            )
        limits.append(asked)
    return time.monotonic() + min(limits) if limits else None


async def abandon_signal(deadline: float | None, ctx: RequestContext | None) -> BaseException:
    """Returns when a request should be given up: its client left (`ctx`), or its deadline
    passed; returns the exception to answer it with."""
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    gone = ctx.disconnected if ctx is not None else asyncio.Event()
    try:
        await asyncio.wait_for(gone.wait(), timeout)
        return RequestCancelledError("the client disconnected")
    except TimeoutError:
        return EngineDeadlineError("the request did not finish within its deadline")


def request_error(err: BaseException) -> BaseException:
    """The exception a request gets for a row that stopped without finishing: its deadline,
    its cancel, or (as it is) the row's own failure."""
    if isinstance(err, RowDeadlineError):
        return EngineDeadlineError("the request did not finish within its deadline")
    if isinstance(err, RowCancelledError):
        return RequestCancelledError("the client disconnected")
    return err
