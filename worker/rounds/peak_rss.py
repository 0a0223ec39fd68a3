"""The worker process's peak resident memory, per stage of a round (Linux ``/proc``).

:class:`PeakRss` resets the kernel's peak counter (``VmHWM``, via ``clear_refs``) when a stage
begins and reads it when the stage ends, so a short spike between two samples still counts
and each stage's number is its own. Before the reset the heap's free pages go back to the
system (:func:`trim`), so a stage does not inherit what the one before it freed. Where the
reset is refused (old kernels, some sandboxes) the number is the process's peak so far, an
upper bound; where ``/proc`` is missing, none.
"""

from __future__ import annotations

import logging
from pathlib import Path

from core.malloc import trim

log = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(key: str) -> int | None:
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name == key:
            return int(rest.split()[0]) * 1024  # kB
    return None


def current_rss() -> int | None:
    """The process's resident set size now, in bytes (None without /proc)."""
    return _status_bytes("VmRSS")


class PeakRss:
    """Peak RSS of this process between :meth:`reset` and :meth:`read`."""

    def __init__(self) -> None:
        self.can_reset = True

    def reset(self) -> None:
        trim()
        if not self.can_reset:
            return
        try:
            _CLEAR_REFS.write_text("5")  # "5": reset the peak RSS to the current RSS
        except OSError as e:
            self.can_reset = False
            log.warning("cannot reset the peak RSS (%s): stage peaks are the peak so far", e)

    def read(self) -> int | None:
        return _status_bytes("VmHWM")
