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

from services.notifications.notices import NOTIFYING_EVENTS, notices_for
from services.notifications.store import NotificationStore
from shared.bus import Bus, Delivery, Scope
from shared.contracts import Event

log = logging.getLogger(__name__)

CONSUMER = "inbox"


def register(bus: Bus, store: NotificationStore) -> None:
    async def on_call_event(event: Event, delivery: Delivery) -> None:
        notices = notices_for(event)
        async with delivery.transaction() as tx:
            for notice in notices:
                store.queue_notice(tx, notice)
        log.info(
            "%s for call %s: %s",
            event.type.value,
            getattr(event, "call_id", "?"),
            ", ".join(f"{n.kind.value} -> {n.user}" for n in notices) or "nothing",
        )

    bus.subscribe(
        CONSUMER,
        dict.fromkeys(NOTIFYING_EVENTS, on_call_event),
        scope=Scope.SERVICE,
    )
