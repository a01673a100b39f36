"""The time: now in UTC, a moment as the ISO-8601 text clients and events read, and a
bounded wait for an event."""

from __future__ import annotations

import asyncio
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


async def wait_set(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``event``: True if it was set, False on the timeout.

    Built on ``asyncio.timeout``, not ``asyncio.wait_for``: on Python 3.11 ``wait_for``
    swallows a cancellation that arrives as the awaited thing completes (CPython
    gh-86296), which leaves a cancelled loop running and a shutdown waiting on it."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True
