"""Event handlers: call events become notifications (see notices.py for which).

One consumer, ``notifications.inbox``, with ``Scope.SERVICE``: one instance of the service
handles each event, however many run. Exactly once: the bus claims each event id for this
consumer, and the handler commits all the event's notifications (stream entries, inbox,
unread flags, push jobs, live wake-ups) in :meth:`shared.bus.Delivery.transaction`,
together with the bus's done mark. A redelivery after the commit is skipped by the bus; a
crash before it leaves nothing behind, and the redelivery does the work. On top of that,
each (user, call, kind) is made once (store.py), so even a republished event with a new
event id does not notify twice.
"""

from __future__ import annotations

import logging

from services.notifications.notices import notices_for
from services.notifications.store import NotificationStore
from shared.bus import Bus, Delivery, Handler, Scope
from shared.contracts import (
    CallAccepted,
    CallCancelled,
    CallDeclined,
    CallEnded,
    CallMissed,
    CallRinging,
    Event,
)

log = logging.getLogger(__name__)

CONSUMER = "inbox"


class NotificationConsumers:
    def __init__(self, store: NotificationStore, bus: Bus) -> None:
        self.store = store
        self.bus = bus

    def register(self) -> None:
        handlers: dict[type[Event], Handler] = {
            model: self.on_call_event
            for model in (
                CallRinging,
                CallAccepted,
                CallDeclined,
                CallCancelled,
                CallMissed,
                CallEnded,
            )
        }
        self.bus.subscribe(CONSUMER, handlers, scope=Scope.SERVICE)

    async def on_call_event(self, event: Event, delivery: Delivery) -> None:
        media = None
        if isinstance(event, CallEnded):
            media = await self.store.call_media(event.call_id)
        notices = notices_for(event, known_media=media)
        async with delivery.transaction() as tx:
            if isinstance(event, CallRinging):
                self.store.queue_call_media(tx, event.call_id, event.media.value)
            for notice in notices:
                self.store.queue_notice(tx, notice)
        log.info(
            "%s for call %s: %s",
            event.type.value,
            getattr(event, "call_id", "?"),
            ", ".join(f"{n.kind.value} -> {n.user}" for n in notices) or "nothing",
        )
