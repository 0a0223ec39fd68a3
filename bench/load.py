"""Load on a real server: client threads posting ``/generate`` back to back, the largest
gap between completions, and a hot swap measured under that load."""

from __future__ import annotations

import itertools
import logging
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.server import Server, generate_body, health

log = logging.getLogger("bench")


@dataclass(frozen=True)
class Outcome:
    sent: float  # monotonic
    done: float
    status: int  # 0: transport error
    version: int | None
    tokens: int


@dataclass
class Load:
    """``clients`` threads posting /generate back to back until stopped; every outcome kept."""

    url: str
    prompts: Sequence[str]
    clients: int = 8
    max_new_tokens: int = 8
    results: list[Outcome] = field(default_factory=list)
    started: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _client(self, i: int) -> None:
        n = 0
        with httpx.Client(timeout=600) as c:
            while not self._stop.is_set():
                prompt = self.prompts[(i + n * self.clients) % len(self.prompts)]
                t0 = time.monotonic()
                try:
                    r = c.post(
                        self.url + "/generate", json=generate_body(prompt, self.max_new_tokens)
                    )
                    ok = r.status_code == 200
                    out = Outcome(
                        t0,
                        time.monotonic(),
                        r.status_code,
                        int(r.headers["x-model-version"]) if ok else None,
                        int(r.headers.get("x-generated-tokens", 0)) if ok else 0,
                    )
                except httpx.HTTPError:
                    out = Outcome(t0, time.monotonic(), 0, None, 0)
                with self._lock:
                    self.results.append(out)
                n += 1

    def answered(self, version: int, since: float) -> bool:
        """Whether a request completed after `since` with an answer from `version`."""
        with self._lock:
            return any(o.version == version and o.done >= since for o in self.results)

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True, name=f"client-{i}")
            for i in range(self.clients)
        ]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=600)


def largest_gap(done_times: Sequence[float], start: float, end: float) -> float:
    """Largest interval between consecutive completions that overlaps ``[start, end]``.

    The last completion before the window and the first after it are included (the window's
    edges where there are none), so a stall that spans an edge still counts in full."""
    return largest_gap_at(done_times, start, end)[0]


def largest_gap_at(done_times: Sequence[float], start: float, end: float) -> tuple[float, float]:
    """`largest_gap` and the time the gap ended (its closing completion)."""
    if end <= start:
        return 0.0, start
    xs = sorted(done_times)
    before = [t for t in xs if t < start]
    after = [t for t in xs if t > end]
    points = [
        before[-1] if before else start,
        *(t for t in xs if start <= t <= end),
        after[0] if after else end,
    ]
    return max((b - a, b) for a, b in itertools.pairwise(points))


def equal_window_gaps(
    done_times: Sequence[float], start: float, end: float, width: float
) -> list[float]:
    """`largest_gap` in each whole window of `width` seconds that fits in ``[start, end]``,
    counted back from `end` (the windows nearest the swap first). The largest gap of a
    window grows with its length, so a swap window is compared with steady ones as long."""
    if width <= 0:
        return []
    gaps, hi = [], end
    while hi - width >= start:
        gaps.append(largest_gap(done_times, hi - width, hi))
        hi -= width
    return gaps


@dataclass
class SwapRun:
    """One swap under load. In a series, `load_started` is where its steady segment began
    (after the previous swap) and `stopped` the next promotion (or the load's end)."""

    results: list[Outcome]
    load_started: float
    promoted: float
    swapped: float
    stopped: float
    promote_status: int
    health_after: dict[str, Any]
    version: int = 2


def run_swap(
    server: Server,
    prompts: Sequence[str],
    version: int = 2,
    clients: int = 8,
    max_new_tokens: int = 8,
    pre_s: float = 3.0,
    post_s: float = 2.0,
    swap_timeout: float = 300.0,
) -> SwapRun:
    """Load the server, promote ``version`` over HTTP, wait until it serves it, keep going."""
    return run_swaps(
        server, prompts, [version], clients, max_new_tokens, pre_s, post_s, swap_timeout
    )[0]


def run_swaps(
    server: Server,
    prompts: Sequence[str],
    versions: Sequence[int],
    clients: int = 8,
    max_new_tokens: int = 8,
    pre_s: float = 3.0,
    post_s: float = 2.0,
    swap_timeout: float = 300.0,
) -> list[SwapRun]:
    """Under one continuous load: for each of ``versions`` in turn, ``pre_s`` of steady
    serving, promote it over HTTP, wait until the replica serves it, ``post_s`` more."""
    marks: list[tuple[int, float, float, float, int, dict[str, Any]]] = []
    with Load(server.url, prompts, clients, max_new_tokens) as load:
        segment = load.started
        for version in versions:
            time.sleep(pre_s)
            promoted = time.monotonic()
            r = httpx.post(f"{server.url}/checkpoints/{version}/promote", timeout=120)
            if r.status_code != 200:
                log.error("promotion answered %d: %s", r.status_code, r.text)
            deadline = promoted + swap_timeout
            swapped = 0.0
            while time.monotonic() < deadline:
                if health(server).get("serving_version") == version:
                    swapped = time.monotonic()
                    break
                time.sleep(0.05)
            if not swapped:
                raise RuntimeError(
                    f"v{version} not served after {swap_timeout:.0f}s:\n{server.tail()}"
                )
            # The swap window ends with the first answer from the new version: wait for it,
            # so `post_s` of steady serving follows every swap, however slow its first batch.
            while time.monotonic() < deadline and not load.answered(version, promoted):
                time.sleep(0.02)
            time.sleep(post_s)
            marks.append((version, segment, promoted, swapped, r.status_code, health(server)))
            segment = time.monotonic()
    stopped = time.monotonic()
    results = sorted(load.results, key=lambda o: o.done)
    ends = [m[2] for m in marks[1:]] + [stopped]
    return [
        SwapRun(results, seg, promoted, swapped, end, status, info, version)
        for (version, seg, promoted, swapped, status, info), end in zip(marks, ends, strict=True)
    ]


def swap_summary(run: SwapRun, margin_s: float = 1.0) -> dict[str, Any]:
    """Requests, failures, largest gap between completions around the swap and before it.

    Counts only the requests that finished inside the run's own segment
    (``load_started`` → ``stopped``), so each swap of a series reads its own."""
    version = run.version
    res = [o for o in run.results if run.load_started <= o.done <= run.stopped]
    failed = [o for o in res if o.status != 200]
    first_new = min(
        (o.done for o in res if o.version == version and o.done >= run.promoted), default=0.0
    )
    # The swap window: from the promotion until the replica serves v2 and a v2 answer is out.
    end = max(run.swapped, first_new)
    done = [o.done for o in res]
    gap, gap_end = largest_gap_at(done, run.promoted, end)
    # Steady state before the swap, for scale: with a static batch, completions come in
    # bursts, so even an undisturbed server has gaps of about one batch's duration.
    steady_start, steady_end = run.load_started + margin_s, run.promoted - margin_s
    # The same before the swap, in windows as long as the swap window (their median).
    steady = equal_window_gaps(done, steady_start, steady_end, end - run.promoted)
    ok = [o for o in res if o.status == 200]
    tokens = sum(o.tokens for o in ok)
    elapsed = run.stopped - run.load_started
    details = run.health_after.get("details", {})
    return {
        "version": version,
        "requests": len(res),
        "failed": len(failed),
        "failed_statuses": sorted({o.status for o in failed}),
        "versions_seen": sorted({o.version for o in ok if o.version is not None}),
        "largest_gap_ms": gap * 1000,
        # Where it fell: its end, after the promotion (the replica switched at promote_to_swapped).
        "largest_gap_ended_after_promotion_ms": (gap_end - run.promoted) * 1000,
        "window_s": end - run.promoted,
        "window_completions": sum(1 for t in done if run.promoted <= t <= end),
        "steady_largest_gap_ms": largest_gap(done, steady_start, steady_end) * 1000,
        "steady_window_s": max(0.0, steady_end - steady_start),
        "steady_equal_window_gaps_ms": [g * 1000 for g in steady],
        "steady_equal_window_gap_ms": statistics.median(steady) * 1000 if steady else None,
        "steady_completions": sum(1 for t in done if steady_start <= t <= steady_end),
        "promote_status": run.promote_status,
        "promote_to_swapped_ms": (run.swapped - run.promoted) * 1000,
        "promote_to_first_v2_response_ms": (first_new - run.promoted) * 1000 if first_new else None,
        "load_seconds": details.get("last_swap_seconds"),
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "requests_after_swap_on_old_version": sum(
            1 for o in ok if o.sent > run.swapped and o.version != version
        ),
    }
