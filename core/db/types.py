"""Column types shared by the models."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp on every backend, always in UTC.

    PostgreSQL keeps the offset (`timestamptz`); SQLite stores text without one and hands
    back naive datetimes, which the API would then print without an offset. This type
    stores UTC and returns aware UTC datetimes from both, so every timestamp the service
    prints is ISO-8601 with its offset. The DDL is the plain `DateTime(timezone=True)`.
    """

    impl = DateTime
    cache_ok = True

    def __init__(self, timezone: bool = True, **kw: Any) -> None:
        super().__init__(timezone=True, **kw)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)  # naive values in this codebase are UTC
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
