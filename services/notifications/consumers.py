"""Event handlers: call events become notifications (see notices.py for which).

One consumer, ``notifications.inbox``, with ``Scope.SERVICE``: one instance of the service
handles each event, however many run. Exactly once: each (user, call, kind) is made once
(its ``once`` key in store.py), and an event's notifications are made in one script
(stream entries, inbox, unread flags, push jobs, live wake-ups), so a redelivery, or a
republished event with a new event id, makes nothing twice; a crash before the script
leaves nothing behind, and the redelivery does the work. So the consumer subscribes with
``marks_done`` and writes no done mark: the bus neither claims nor marks its events. An
event that notifies nobody (a group call's ``call_ended``) costs no Redis write of ours.
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
        if notices:
            await store.add_notices(notices)
        log.info(
            "%s for call %s: %s",
            event.type.value,
            getattr(event, "call_id", "?"),
            ", ".join(f"{n.kind.value} -> {n.user}" for n in notices) or "nothing",
        )

    # marks_done: no claim and no done mark from the bus (two round trips an event fewer).
    bus.subscribe(
        CONSUMER,
        dict.fromkeys(NOTIFYING_EVENTS, on_call_event),
        scope=Scope.SERVICE,
        marks_done=True,
    )
