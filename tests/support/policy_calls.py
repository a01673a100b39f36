"""Calls that policy really judged, for the report tests: a ``call_requested`` published as
signaling would, and the wait until a consumer of policy's has handled an event; the verdicts
policy published, as an event tap saw them."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from shared.bus import Bus
from shared.contracts import CallRequested, Event, EventType, MediaKind
from tests.support.signaling import EventTap
from tests.support.waiting import eventually


async def judged_call(
    bus: Bus, redis: Redis, namespace: str, caller: str, callee: str, call_id: str | None = None
) -> str:
    """Publish ``call_requested`` caller -> callee; return its call id once policy decided it."""
    event = CallRequested(
        call_id=call_id or uuid.uuid4().hex, caller=caller, callee=callee, media=MediaKind.AUDIO
    )
    await bus.publish(event)
    await eventually(handled(redis, namespace, "verdicts", event))
    return event.call_id


def handled(redis: Redis, namespace: str, consumer: str, *events: Event) -> Callable[[], Any]:
    """True once policy's ``consumer`` has finished each event (the bus's done mark)."""

    async def check() -> bool:
        keys = [f"dmcall:{namespace}:bus:seen:policy.{consumer}:{e.event_id}" for e in events]
        return all(v == b"done" for v in await redis.mget(keys))

    return check


def verdicts_in(tap: EventTap) -> list[dict[str, Any]]:
    """Every verdict on ``tap``, each copy published (the bus's consumers drop copies)."""
    kinds = (EventType.CALL_AUTHORIZED.value, EventType.CALL_REJECTED.value)
    return [m for m in tap.messages if m["type"] in kinds]
