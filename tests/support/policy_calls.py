"""Calls that policy really judged, for the report tests: a ``call_requested`` published as
signaling would, and the wait until policy's verdict consumer has handled it; the verdicts
policy published, as an event tap saw them."""

from __future__ import annotations

import uuid
from typing import Any

from redis.asyncio import Redis

from shared.bus import Bus
from shared.contracts import CallRequested, EventType, MediaKind
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
    done = f"dmcall:{namespace}:bus:seen:policy.verdicts:{event.event_id}"

    async def handled() -> bool:
        return bool(await redis.get(done) == b"done")

    await eventually(handled)
    return event.call_id


def verdicts_in(tap: EventTap) -> list[dict[str, Any]]:
    """Every verdict on ``tap``, each copy published (the bus's consumers drop copies)."""
    kinds = (EventType.CALL_AUTHORIZED.value, EventType.CALL_REJECTED.value)
    return [m for m in tap.messages if m["type"] in kinds]
