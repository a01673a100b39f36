"""Event handlers of the media service: a call that ends closes its room; a group call's
participant that leaves has its session closed and its older grants refused.

Every media instance receives these (``Scope.INSTANCE``): a room lives in one process,
and only that one has it. Closing is idempotent, so a redelivery does nothing twice. A
node records the end of a call it hosts or was granted (an end event that arrives after
a party's token was presented but before the room opened still refuses a late session);
the end of any other call is not its concern and leaves nothing behind.

Only ``call_ended`` ends a room. ``call_declined``, ``call_cancelled`` and ``call_missed``
are not consumed: a 1:1 call's come before an answer, and media grants are minted only at
the answer (CONTRACT.md), so no node has a room or a grant for that call; a group call's
are one invitee's outcome, and the room lasts until ``call_ended``.
"""

from __future__ import annotations

from typing import Any

from services.media.room import CloseReason
from services.media.rooms import Rooms
from shared.bus import Bus, Delivery, Scope
from shared.contracts import CallEnded, CallParticipantLeft

CONSUMER = "rooms"


def register(bus: Bus, rooms: Rooms) -> None:
    async def call_ended(event: Any, delivery: Delivery) -> None:
        assert isinstance(event, CallEnded)
        await rooms.close_room(event.call_id, CloseReason.CALL_ENDED)

    async def participant_left(event: Any, delivery: Delivery) -> None:
        # Idempotent and order-safe: judged by the grant's iat against the leave's time,
        # not by when the event arrived (a session from a later grant stays).
        assert isinstance(event, CallParticipantLeft)
        await rooms.participant_left(event.call_id, event.user, event.occurred_at.timestamp())

    bus.subscribe(
        CONSUMER,
        {CallEnded: call_ended, CallParticipantLeft: participant_left},
        scope=Scope.INSTANCE,
    )
