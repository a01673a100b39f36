"""The call service in-process against the real Redis and RabbitMQ, where a test must
choose the order of things: glare either way round and at the same instant, many
instances firing one ring timer, an outbox event whose committer died, duplicated and
out-of-order events."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from services.signaling.domain import Call
from services.signaling.store import CallStore, Commit
from shared.bus import AlreadyHandled
from shared.clock import utcnow
from shared.contracts import (
    CallAuthorized,
    CallMediaConnected,
    CallMissed,
    CallState,
    EventType,
    MediaKind,
    MediaMoveReason,
    parse_event,
)
from shared.media_registry import MediaNode
from tests.support.signaling import NODE, EventTap, InProcess
from tests.support.waiting import eventually


async def place(one: InProcess, caller: str, callee: str, device: str) -> Call:
    return await one.service.place(
        caller, callee, MediaKind.AUDIO, device_id=device, idempotency_key=None
    )


def authorized(call: Call) -> CallAuthorized:
    return CallAuthorized(
        call_id=call.call_id, caller=call.caller, callee=call.callee, media=call.media
    )


async def state_of(one: InProcess, call: Call) -> Call:
    got = await one.store.get(call.call_id)
    assert got is not None
    return got


async def test_glare_when_the_call_being_authorized_is_the_lesser(
    in_process: Callable[..., Any], tap: EventTap
) -> None:
    (one,) = await in_process(1)
    x = await place(one, "alice", "bob", "a1")
    await asyncio.sleep(0.002)  # ids are time-ordered to the millisecond
    y = await place(one, "bob", "alice", "b1")
    assert x.call_id < y.call_id
    await one.service.authorized(authorized(y))  # y rings first
    assert (await state_of(one, y)).state is CallState.RINGING
    await one.service.authorized(authorized(x))  # x, the lesser, wins and connects at once
    won, lost = await state_of(one, x), await state_of(one, y)
    assert won.state is CallState.ACCEPTED and won.answered_device == "b1"
    assert won.media_node == NODE.node_id
    assert (lost.state, lost.replaced_by) == (CallState.CANCELLED, x.call_id)
    await eventually(lambda: tap.of(EventType.CALL_ACCEPTED, x.call_id))
    assert tap.of(EventType.CALL_CANCELLED, y.call_id)
    assert tap.of(EventType.CALL_RINGING, x.call_id) == []
    history = await one.service.history("alice", limit=10, before=None)
    assert [c["call_id"] for c in history[0]] == [x.call_id]


async def test_glare_authorized_at_the_same_instant_on_two_instances_keeps_one_call(
    in_process: Callable[..., Any],
) -> None:
    one, two = await in_process(2)
    for _ in range(5):
        x = await place(one, "carol", "dave", "c1")
        y = await place(two, "dave", "carol", "d1")
        await asyncio.gather(
            one.service.authorized(authorized(x)), two.service.authorized(authorized(y))
        )
        states = {(await state_of(one, c)).state for c in (x, y)}
        assert states == {CallState.ACCEPTED, CallState.CANCELLED}
        lesser = min((x, y), key=lambda c: c.call_id)
        assert (await state_of(one, lesser)).state is CallState.ACCEPTED
        await one.service.hangup("carol", lesser.call_id)


class HeldAfterLiveRead(CallStore):
    """A store that, once a decision has read the live calls, waits for a gate before the
    decision goes on to commit. It lets a test put another commit in between."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.read = asyncio.Event()

    async def live_calls_of(self, users: Sequence[str]) -> dict[str, list[Call]]:
        calls = await super().live_calls_of(users)
        if not self.read.is_set():
            self.read.set()
            await self.gate.wait()
        return calls


async def test_glare_when_the_reverse_call_starts_ringing_after_the_read(
    in_process: Callable[..., Any],
) -> None:
    one, two = await in_process(2)
    x = await place(one, "kim", "lee", "k1")
    await asyncio.sleep(0.002)  # ids are time-ordered to the millisecond
    y = await place(two, "lee", "kim", "l1")
    # Instance two judges y: it has read both parties' live calls (x among kim's, only
    # requested) ...
    settings = two.service.settings
    held = HeldAfterLiveRead(two.store.redis, settings, outbox_lease_ms=settings.outbox_lease_ms)
    two.service.store = held
    judging = asyncio.create_task(two.service.authorized(authorized(y)))
    await asyncio.wait_for(held.read.wait(), 10)
    # ... when instance one makes x ring; two's commit, made on what it read, must not stand.
    await one.service.authorized(authorized(x))
    assert (await state_of(one, x)).state is CallState.RINGING
    held.gate.set()
    await asyncio.wait_for(judging, 10)
    # One call, not two ringing: x (the lesser, the one that rang) connects.
    assert x.call_id < y.call_id
    won, lost = await state_of(one, x), await state_of(one, y)
    assert won.state is CallState.ACCEPTED and won.answered_device == "l1"
    assert (lost.state, lost.replaced_by) == (CallState.CANCELLED, x.call_id)


async def test_many_instances_fire_one_ring_timer_exactly_once(
    in_process: Callable[..., Any], tap: EventTap
) -> None:
    many = await in_process(4)
    call = await place(many[0], "erin", "frank", "e1")
    await many[0].service.authorized(authorized(call))
    ringing = await state_of(many[0], call)
    # Pull the deadline into the past, as if the ring timeout had passed.
    past = replace(ringing, ring_deadline=utcnow() - timedelta(milliseconds=10))
    commit = Commit()
    many[0].store.stage(commit, ringing, past)
    await many[0].store.commit(commit)
    fired = await asyncio.gather(*(i.service.ring_timeout(call.call_id) for i in many * 3))
    assert sum(fired) == 1
    assert (await state_of(many[0], call)).state is CallState.MISSED
    await eventually(lambda: tap.of(EventType.CALL_MISSED, call.call_id))
    await many[0].settle(tap)  # what every firing committed is on the tap now
    assert len(tap.of(EventType.CALL_MISSED, call.call_id)) == 1
    assert (await many[0].store.ring_poll(2**62))[0] == []


async def test_an_event_whose_committer_died_is_published_by_another_instance(
    in_process: Callable[..., Any], tap: EventTap
) -> None:
    one, two = await in_process(2)
    # A commit with an event, and no publish after it: its instance "died" there.
    call = await place(one, "gina", "hal", "g1")
    current = await state_of(one, call)
    missed_event = CallMissed(
        call_id=call.call_id, caller="gina", callee="hal", media=MediaKind.AUDIO
    )
    commit = Commit(events=[missed_event])
    one.store.stage(commit, current, current)
    await one.store.commit(commit)
    assert await two.store.claim_outbox() == []  # still leased to its committer
    await asyncio.sleep(0.6)
    claimed = await two.store.claim_outbox()
    assert [event_id for event_id, _ in claimed] == [str(missed_event.event_id)]
    assert await one.store.claim_outbox() == []  # now leased to the second instance
    await two.service.publish([parse_event(body) for _, body in claimed])
    await eventually(lambda: tap.of(EventType.CALL_MISSED, call.call_id))
    assert tap.of(EventType.CALL_MISSED, call.call_id)[0]["event_id"] == str(missed_event.event_id)
    await asyncio.sleep(0.6)
    assert await one.store.claim_outbox() == []  # published: gone from the outbox


async def test_a_commit_carrying_an_events_done_mark_applies_once(
    in_process: Callable[..., Any],
) -> None:
    """The bus's done mark in the step's commit (the ``calls`` consumer's ``marks_done``):
    a copy of the event whose commit would apply finds the mark and changes nothing."""
    (one,) = await in_process(1)
    call = await state_of(one, await place(one, "olga", "pete", "o1"))
    done = (one.store.keys("seen", call.call_id), 60)
    first = Commit(done=done)
    one.store.stage(first, call, call)
    await one.store.commit(first)
    copy = Commit(done=done)
    one.store.stage(copy, await state_of(one, call), call)  # the version it would find
    with pytest.raises(AlreadyHandled):
        await one.store.commit(copy)
    assert (await state_of(one, call)).version == call.version + 1


async def test_duplicated_and_out_of_order_events_change_nothing_twice(
    in_process: Callable[..., Any], tap: EventTap
) -> None:
    (one,) = await in_process(1)
    call = await place(one, "ivan", "judy", "i1")
    early = CallMediaConnected(call_id=call.call_id, node_id=NODE.node_id)
    await one.service.media_connected(early)  # before accept: refused, dropped
    assert (await state_of(one, call)).state is CallState.REQUESTED
    event = authorized(call)
    await asyncio.gather(*(one.service.authorized(event) for _ in range(3)))
    await one.service.authorized(authorized(call))  # a second event id, same verdict
    assert (await state_of(one, call)).state is CallState.RINGING
    await eventually(lambda: tap.of(EventType.CALL_RINGING, call.call_id))
    await one.settle(tap)
    assert len(tap.of(EventType.CALL_RINGING, call.call_id)) == 1
    await one.service.accept("judy", call.call_id, "j1")
    stranger = CallMediaConnected(call_id=call.call_id, node_id="another-node")
    await one.service.media_connected(stranger)
    assert (await state_of(one, call)).state is CallState.ACCEPTED
    await one.service.media_connected(early)
    await one.service.media_connected(early)
    assert (await state_of(one, call)).state is CallState.ACTIVE


async def test_many_instances_moving_one_call_off_a_lost_node_move_it_once(
    in_process: Callable[..., Any],
) -> None:
    many = await in_process(4)
    call = await place(many[0], "kai", "lia", "k1")
    await many[0].service.authorized(authorized(call))
    await many[0].service.accept("lia", call.call_id, "l1")
    assert (await state_of(many[0], call)).media_node == NODE.node_id
    assert await many[0].store.node_calls(NODE.node_id) == [call.call_id]
    spare = MediaNode(node_id="node-b", url="http://127.0.0.1:9/b", capacity=10, load=0)
    await many[0].service.registry.heartbeat(spare, ttl_s=300)
    await many[0].service.registry.deregister(NODE.node_id)

    moved = await asyncio.gather(
        *(
            one.service.move_media(call.call_id, NODE.node_id, MediaMoveReason.NODE_LOST)
            for one in many * 3
        ),
        *(one.service.move_off_unusable_nodes() for one in many),
    )
    assert sum(moved) == 1
    after = await state_of(many[0], call)
    assert (after.state, after.media_node) == (CallState.ACCEPTED, spare.node_id)
    assert after.rejoin_deadline is not None
    # The index follows the call: the lost node hosts nothing, the spare hosts it.
    store = many[0].store
    assert await store.node_calls(NODE.node_id) == []
    assert await store.node_calls(spare.node_id) == [call.call_id]
    assert await store.call_nodes() == [spare.node_id]
    await many[0].service.hangup("kai", call.call_id)
    assert await store.call_nodes() == []
    assert await store.rejoin_poll(2**62) == ([], None)
