"""A JSON file of :class:`~worker.rounds.textstats.DiversityStats` by key, written atomically:
the on-disk part of the diversity cache and the real-text cache."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from worker.rounds.textstats import DiversityStats

log = logging.getLogger(__name__)


class StatsFile:
    """``{"<key>": {distinct_1, distinct_2, repetition_rate}}`` at ``path``; an unreadable
    file or entry reads as missing (the numbers are measured again)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            log.warning("unreadable stats cache %s; starting afresh", self.path)
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> DiversityStats | None:
        entry = self.read().get(key)
        if not isinstance(entry, dict):
            return None
        try:
            return DiversityStats(
                distinct_1=float(entry["distinct_1"]),
                distinct_2=float(entry["distinct_2"]),
                repetition_rate=float(entry["repetition_rate"]),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def put(self, key: str, stats: DiversityStats) -> None:
        data = self.read()
        data[key] = asdict(stats)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.stem}-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
