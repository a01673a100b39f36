"""Signaling's performance changes keep their meaning (docs/performance.md): the ring timer
works through a burst of due calls together and still misses each exactly once, and a
push reads the presence of all its users at once, still pruning devices of dead
instances. In-process against the real Redis and RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

from services.signaling.domain import Call
from services.signaling.store import Commit
from services.signaling.timers import ring_timer_loop
from shared.clock import utcnow
from shared.contracts import CallAuthorized, CallState, EventType, MediaKind
from tests.support.signaling import EventTap
from tests.support.waiting import eventually


async def test_a_burst_of_due_calls_is_missed_in_one_pass_each_exactly_once(
    in_process: Callable[..., Any], tap: EventTap
) -> None:
    (one,) = await in_process(1)
    service, store = one.service, one.store

    async def overdue(index: int) -> Call:
        """A call ringing, its deadline in the past: the timer's next pass finds it due."""
        call = await service.place(
            f"caller-{index}", f"callee-{index}", MediaKind.AUDIO, device_id=None,
            idempotency_key=None,
        )  # fmt: skip
        await service.authorized(
            CallAuthorized(
                call_id=call.call_id, caller=call.caller, callee=call.callee, media=call.media
            )
        )
        ringing = await store.get(call.call_id)
        assert ringing is not None and ringing.state is CallState.RINGING
        commit = Commit()
        store.stage(
            commit, ringing, replace(ringing, ring_deadline=utcnow() - timedelta(milliseconds=5))
        )
        await store.commit(commit)
        return call

    calls = [await overdue(index) for index in range(30)]  # all due at once
    timer = asyncio.create_task(ring_timer_loop(service, store, poll_ms=50))
    try:

        async def all_missed() -> bool:
            states = [await store.get(c.call_id) for c in calls]
            return all(s is not None and s.state is CallState.MISSED for s in states)

        await eventually(all_missed, timeout=20)
        await eventually(
            lambda: all(tap.of(EventType.CALL_MISSED, c.call_id) for c in calls), timeout=10
        )
        # A later pass must not miss anything twice: one more call due, missed by a pass
        # after those, and what every pass committed is on the tap.
        marker = await overdue(30)
        await eventually(lambda: tap.of(EventType.CALL_MISSED, marker.call_id), timeout=10)
        await one.settle(tap)
        for call in calls:
            assert len(tap.of(EventType.CALL_MISSED, call.call_id)) == 1
        assert (await store.ring_poll(2**62))[0] == []
    finally:
        timer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await timer


async def test_presence_of_several_users_is_read_at_once_and_dead_instances_pruned(
    in_process: Callable[..., Any],
) -> None:
    (one,) = await in_process(1)
    store = one.store
    await store.heartbeat_instance("live-1", ttl_s=60)
    await store.register_device("ann", "a1", "live-1")
    await store.register_device("ann", "a2", "live-1")
    await store.register_device("ben", "b1", "live-1")
    await store.register_device("ben", "b2", "dead-1")  # its instance never heartbeats
    found = await store.devices_of(["ann", "ben", "cat"])
    assert found == {
        "ann": {"a1": "live-1", "a2": "live-1"},
        "ben": {"b1": "live-1"},
        "cat": {},
    }
    # The dead instance's device is gone from Redis too, not only from the answer.
    assert await store.redis.hgetall(store.presence_key("ben")) == {b"b1": b"live-1"}  # type: ignore[misc]
    assert await store.devices("ann") == found["ann"]


async def test_live_calls_of_several_users_in_one_read_and_published_events_leave_the_outbox(
    in_process: Callable[..., Any], tap: EventTap
) -> None:
    (one,) = await in_process(1)
    service, store = one.service, one.store
    first = await service.place("kim", "lee", MediaKind.AUDIO, device_id=None, idempotency_key=None)
    second = await service.place("kim", "mo", MediaKind.VIDEO, device_id=None, idempotency_key=None)
    live = await store.live_calls_of(["kim", "lee", "nobody"])
    assert sorted(c.call_id for c in live["kim"]) == sorted([first.call_id, second.call_id])
    assert {c.call_id: c.media for c in live["kim"]} == {
        first.call_id: MediaKind.AUDIO,
        second.call_id: MediaKind.VIDEO,
    }
    assert live["lee"] == []  # a callee's call is live for them from ringing on
    assert live["nobody"] == []
    assert await store.live_calls("kim") == live["kim"]
    # Both call_requested were published, so the outbox empties without any relay.
    await eventually(lambda: tap.of(EventType.CALL_REQUESTED, second.call_id))
    await eventually(one.published_all)
    assert await store.redis.zcard(store.outbox_due_key) == 0
