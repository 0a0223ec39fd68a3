"""Resident memory of a process from ``/proc`` (no psutil): one reading, the peak reset, and a
sampling thread."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

log = logging.getLogger("bench")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM / VmSize and the RssAnon / RssFile split of ``pid`` in bytes, from /proc
    (no psutil). RssFile counts mapped file pages: a checkpoint left mapped shows there."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "VmSize", "RssAnon", "RssFile"):
            parts = rest.split()
            out[key] = int(parts[0]) * 1024  # kB
    return out


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0, ``echo 5 > clear_refs``)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError as e:
        log.warning("cannot reset the peak RSS of %d (%s); using sampled peaks only", pid, e)
        return False


class RssSampler:
    """Samples a process's VmRSS every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = proc_status(self.pid).get("VmRSS", 0)
            except OSError:
                return  # the process is gone
            self.samples.append((time.monotonic(), rss))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def peak(self, start: float, end: float) -> int:
        return max((r for t, r in self.samples if start <= t <= end), default=0)

    def count(self, start: float, end: float) -> int:
        return sum(1 for t, _ in self.samples if start <= t <= end)
