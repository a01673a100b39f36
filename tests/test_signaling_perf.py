"""Signaling's performance changes keep their meaning (docs/performance.md): the ring timer
works through a burst of due calls together and still misses each exactly once, and a
push reads the presence of all its users at once, still pruning devices of dead
instances. In-process against the real Redis and RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from redis.asyncio import Redis

from services.signaling.calls import CallService
from services.signaling.presence import Hub
from services.signaling.settings import SignalingSettings
from services.signaling.store import CallStore, Commit
from services.signaling.timers import ring_timer_loop
from shared import redis as shared_redis
from shared.bus import Bus
from shared.clock import utcnow
from shared.contracts import CallAuthorized, CallState, EventType, MediaKind
from shared.media_registry import MediaNode, MediaRegistry
from tests.conftest import Infra
from tests.support.signaling import EventTap, event_tap
from tests.support.waiting import eventually

NODE = MediaNode(node_id="node-a", url="http://127.0.0.1:9/", capacity=10, load=0)


@pytest.fixture
async def signaling(
    make_settings: Callable[..., Any], infra: Infra, namespace: str
) -> AsyncIterator[tuple[CallService, CallStore, EventTap]]:
    settings: SignalingSettings = make_settings(SignalingSettings, instance_id="sig-perf")
    redis: Redis = shared_redis.connect(settings, name="test-signaling-perf")
    bus = Bus(settings, redis, "signaling")
    await asyncio.wait_for(bus.start(), 15)
    store = CallStore(redis, settings, outbox_lease_ms=settings.outbox_lease_ms)
    registry = MediaRegistry(redis, settings)
    await registry.heartbeat(NODE, ttl_s=300)
    service = CallService(settings, store, Hub(store, bus, settings.instance_id), bus, registry)
    async with event_tap(infra.rabbitmq_url, namespace) as tap:
        yield service, store, tap
    await bus.close()
    await redis.aclose()


async def test_a_burst_of_due_calls_is_missed_in_one_pass_each_exactly_once(
    signaling: tuple[CallService, CallStore, EventTap],
) -> None:
    service, store, tap = signaling
    calls = []
    for index in range(30):
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
        # Every deadline in the past at once: the timer's next pass finds all 30 due.
        commit = Commit()
        store.stage(
            commit, ringing, replace(ringing, ring_deadline=utcnow() - timedelta(milliseconds=5))
        )
        await store.commit(commit)
        calls.append(call)
    timer = asyncio.create_task(ring_timer_loop(service, store, poll_ms=50))
    try:

        async def all_missed() -> bool:
            states = [await store.get(c.call_id) for c in calls]
            return all(s is not None and s.state is CallState.MISSED for s in states)

        await eventually(all_missed, timeout=20)
        await eventually(
            lambda: all(tap.of(EventType.CALL_MISSED, c.call_id) for c in calls), timeout=10
        )
        await asyncio.sleep(0.5)  # a second pass must not miss anything twice
        for call in calls:
            assert len(tap.of(EventType.CALL_MISSED, call.call_id)) == 1
        assert (await store.ring_poll(2**62))[0] == []
    finally:
        timer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await timer


async def test_presence_of_several_users_is_read_at_once_and_dead_instances_pruned(
    signaling: tuple[CallService, CallStore, EventTap],
) -> None:
    _, store, _ = signaling
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
    signaling: tuple[CallService, CallStore, EventTap],
) -> None:
    service, store, tap = signaling
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

    async def outbox_empty() -> bool:
        return await store.redis.hlen(store.outbox_key) == 0  # type: ignore[misc,no-any-return]

    await eventually(outbox_empty)
    assert await store.redis.zcard(store.outbox_due_key) == 0
