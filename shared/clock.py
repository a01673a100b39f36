"""The time: now in UTC, and a moment as the ISO-8601 text clients and events read."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


def utcnow() -> datetime:
    return datetime.now(UTC)


@overload
def iso(moment: datetime) -> str: ...
@overload
def iso(moment: None) -> None: ...
def iso(moment: datetime | None) -> str | None:
    """``2026-12-01T13:50:00.123456Z`` (UTC, ``Z`` for ``+00:00``); None stays None."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z") if moment else None
