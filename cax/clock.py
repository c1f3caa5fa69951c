"""UTC time for everything cax records or compares (the original mixed local time and UTC)."""

from __future__ import annotations

import datetime as dt
from typing import Any

UTC = dt.timezone.utc


def utcnow() -> dt.datetime:
    """Return the current time as an aware UTC datetime, at the millisecond (as BSON keeps it)."""
    now = dt.datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def as_utc(value: dt.datetime) -> dt.datetime:
    """Return ``value`` as an aware UTC datetime; naive values are UTC, as in the runs DB."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def when(value: Any) -> str:
    """A time for a message: always with its date, in UTC."""
    if not isinstance(value, dt.datetime):
        return "never" if value is None else str(value)
    return as_utc(value).strftime("%Y-%m-%d %H:%M:%S UTC")
