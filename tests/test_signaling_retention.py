"""``SIGNALING_CALL_RETENTION_S``: call history is bounded in Redis. An ended call's record
gets the retention as its TTL in the commit that ends it; a history lists only the calls
placed within the retention, and a commit that adds to it drops the older ones."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from services.signaling.settings import SignalingSettings
from shared.contracts import CallAuthorized, CallState, MediaKind
from tests.support.signaling import InProcess

DAY_S = 86_400
RETENTION_S = 30 * DAY_S


def call_id_at(unix_ms: int, tail: str = "7000800000000000000") -> str:
    """A call id as shared.ids makes them (48-bit Unix ms first), placed at ``unix_ms``."""
    return f"{unix_ms:012x}{tail}0"[:32]


async def answered_and_hung_up(one: InProcess, caller: str, callee: str) -> str:
    call = await one.service.place(
        caller, callee, MediaKind.AUDIO, device_id=f"{caller}-1", idempotency_key=None
    )
    await one.service.authorized(
        CallAuthorized(call_id=call.call_id, caller=caller, callee=callee, media=call.media)
    )
    await one.service.accept(callee, call.call_id, device_id=f"{callee}-1")
    ended = await one.service.hangup(caller, call.call_id)
    assert ended.state is CallState.ENDED
    return call.call_id


async def test_an_ended_call_expires_after_the_retention_and_history_drops_older_calls(
    in_process: Callable[..., Any],
) -> None:
    (one,) = await in_process(1, call_retention_s=RETENTION_S)
    redis, store = one.store.redis, one.store
    now_ms = int(time.time() * 1000)
    too_old = call_id_at(now_ms - (RETENTION_S + DAY_S) * 1000)
    kept = call_id_at(now_ms - (RETENTION_S - DAY_S) * 1000)
    await redis.zadd(store.history_key("alice"), {too_old: 0, kept: 0})

    call_id = await answered_and_hung_up(one, "alice", "bob")

    ttl_ms = await redis.pttl(store.call_key(call_id))
    assert (RETENTION_S - 60) * 1000 < ttl_ms <= RETENTION_S * 1000
    for user in ("alice", "bob"):
        history_ttl = await redis.pttl(store.history_key(user))
        assert (RETENTION_S - 60) * 1000 < history_ttl <= RETENTION_S * 1000
    members = {m.decode() for m in await redis.zrange(store.history_key("alice"), 0, -1)}
    assert members == {kept, call_id}  # the commit dropped the call placed before it
    # An entry older than the retention that no commit has dropped yet is not listed,
    # even where its record is still there.
    record = await redis.hgetall(store.call_key(call_id))
    for other in (too_old, kept):
        await redis.hset(store.call_key(other), mapping={**record, b"call_id": other})
    await redis.zadd(store.history_key("alice"), {too_old: 0})
    calls, cursor = await store.history("alice", limit=10, before=None)
    assert [c.call_id for c in calls] == [call_id, kept] and cursor is None
    calls, cursor = await store.history("alice", limit=1, before=call_id)
    assert [c.call_id for c in calls] == [kept] and cursor == kept
    assert (await store.history("alice", limit=1, before=kept)) == ([], None)

    # A call that is still going on does not expire, whatever its age.
    live = await one.service.place(
        "carol", "dave", MediaKind.VIDEO, device_id="carol-1", idempotency_key=None
    )
    assert await redis.pttl(store.call_key(live.call_id)) == -1


async def test_without_a_retention_calls_and_history_are_kept(
    in_process: Callable[..., Any],
) -> None:
    (one,) = await in_process(1)
    call_id = await answered_and_hung_up(one, "erin", "frank")
    assert await one.store.redis.pttl(one.store.call_key(call_id)) == -1
    assert await one.store.redis.pttl(one.store.history_key("erin")) == -1
    old = call_id_at(int(time.time() * 1000) - 400 * DAY_S * 1000)
    await one.store.redis.zadd(one.store.history_key("erin"), {old: 0})
    await answered_and_hung_up(one, "erin", "frank")
    assert await one.store.redis.zscore(one.store.history_key("erin"), old) == 0


def test_a_retention_shorter_than_the_idempotency_window_is_refused() -> None:
    with pytest.raises(ValidationError, match="SIGNALING_IDEMPOTENCY_TTL_S"):
        SignalingSettings(call_retention_s=3_600, idempotency_ttl_s=DAY_S)
    assert SignalingSettings(call_retention_s=DAY_S, idempotency_ttl_s=DAY_S).call_retention_s
