"""shared/clock.py's bounded wait: it times out, it returns when set, and a cancellation
that arrives as the event is set still cancels (Python 3.11's ``asyncio.wait_for`` would
return instead, which once kept a media node's heartbeat beating through its shutdown)."""

from __future__ import annotations

import asyncio

import pytest

from shared.clock import wait_set


async def test_wait_set_returns_whether_the_event_was_set() -> None:
    event = asyncio.Event()
    assert await wait_set(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_set(event, 5) is True


async def test_a_cancellation_as_the_event_is_set_is_not_swallowed() -> None:
    """Cancelled at every point between the set and the wait's return: a cancellation the
    task accepted (``cancel()`` is True) always ends it cancelled."""
    accepted = 0
    for hops in range(4):
        event = asyncio.Event()
        waiting = asyncio.create_task(wait_set(event, 10))
        await asyncio.sleep(0)  # it waits on the event
        event.set()
        for _ in range(hops):
            await asyncio.sleep(0)
        if waiting.cancel():
            accepted += 1
            with pytest.raises(asyncio.CancelledError):
                await waiting
        else:
            assert await waiting is True  # it had returned before the cancellation
    assert accepted >= 1
