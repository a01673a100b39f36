"""What each call event tells whom: the pure mapping from events to notifications.

Only the callee is notified: their devices ring, stop ringing, and learn of a missed call.
The caller hears the outcome on signaling's WebSocket.

| event | notifications for the callee |
|---|---|
| ``call_ringing`` | ``incoming_call`` (high priority, with ``ring_deadline``) |
| ``call_accepted`` / ``call_declined`` / ``call_cancelled`` | ``ring_stopped`` |
| ``call_missed`` | ``ring_stopped``, then ``missed_call`` |
| ``call_ended`` | ``ring_stopped``; also ``missed_call`` when the reason is busy or missed |

A ``missed_call`` carries the call's ``media`` from its event (``call_missed``, or
``call_ended``, which signaling always gives it); ``null`` only for a ``call_ended`` from a
producer that predates the field (see shared/contracts.py).

In a group call each invitee has their own events (``callee`` = that invitee, ``group``
set): their ``incoming_call`` and ``missed_call`` carry ``"group"`` (the conversation), so
a device shows "alice in <group>"; a 1:1 call's have no ``group`` field, as before. A
group call's ``call_ended`` (no callee) makes nothing: each invitee's own event stopped
their ringing.

A (user, call, kind) notification is made at most once (see store.py): a call that stopped
ringing stops once, a missed call is missed once even if both ``call_missed`` and
``call_ended(busy)`` arrive, and an ``incoming_call`` that arrives after its call stopped
ringing (out of order) is not made at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from shared.clock import iso
from shared.contracts import (
    CallAccepted,
    CallCancelled,
    CallDeclined,
    CallEnded,
    CallMissed,
    CallRinging,
    EndReason,
    Event,
    MediaKind,
)


class NoticeKind(StrEnum):
    INCOMING_CALL = "incoming_call"
    MISSED_CALL = "missed_call"
    RING_STOPPED = "ring_stopped"

    @property
    def in_inbox(self) -> bool:
        """Inbox notifications are kept and listed; ``ring_stopped`` is only streamed and pushed."""
        return self is not NoticeKind.RING_STOPPED


class RingStopReason(StrEnum):
    ANSWERED = "answered"
    DECLINED = "declined"
    CANCELLED = "cancelled"
    MISSED = "missed"
    ENDED = "ended"


class Priority(StrEnum):
    HIGH = "high"
    """Wake the phone now (a call screen: iOS CallKit, Android full-screen intent)."""
    NORMAL = "normal"


MISSED_END_REASONS = frozenset({EndReason.BUSY, EndReason.MISSED})


@dataclass(frozen=True, slots=True)
class Notice:
    """One notification for one user, before it has an id."""

    user: str
    kind: NoticeKind
    call_id: str
    fields: dict[str, Any] = field(default_factory=dict)
    """The notification object as clients see it, minus ``id`` (and ``read`` for the inbox)."""

    @property
    def priority(self) -> Priority:
        """How urgently its pushes go: decided here only (each push job carries it)."""
        return Priority.HIGH if self.kind is NoticeKind.INCOMING_CALL else Priority.NORMAL


def _ring_stopped(event: Event, callee: str, call_id: str, reason: RingStopReason) -> Notice:
    fields: dict[str, Any] = {
        "kind": NoticeKind.RING_STOPPED.value,
        "call_id": call_id,
        "reason": reason.value,
        "created_at": iso(event.occurred_at),
    }
    if isinstance(event, CallAccepted):
        fields["device_id"] = event.device_id
    return Notice(callee, NoticeKind.RING_STOPPED, call_id, fields)


def _missed(
    event: Event, caller: str, callee: str, call_id: str, media: MediaKind | None
) -> Notice:
    fields: dict[str, Any] = {
        "kind": NoticeKind.MISSED_CALL.value,
        "call_id": call_id,
        "from": caller,
        "media": media.value if media is not None else None,
        "created_at": iso(event.occurred_at),
    }
    _name_the_group(fields, event)
    return Notice(callee, NoticeKind.MISSED_CALL, call_id, fields)


def _name_the_group(fields: dict[str, Any], event: Event) -> None:
    group = getattr(event, "group", None)
    if group is not None:
        fields["group"] = group


NOTIFYING_EVENTS: tuple[type[Event], ...] = (
    CallRinging,
    CallAccepted,
    CallDeclined,
    CallCancelled,
    CallMissed,
    CallEnded,
)
"""The events :func:`notices_for` makes notifications of: what the consumer subscribes to."""


def notices_for(event: Event) -> list[Notice]:
    """The notifications one event makes, in the order they are to be delivered."""
    if isinstance(event, CallRinging):
        fields = {
            "kind": NoticeKind.INCOMING_CALL.value,
            "call_id": event.call_id,
            "from": event.caller,
            "media": event.media.value,
            "created_at": iso(event.occurred_at),
            "ring_deadline": iso(event.ring_deadline),
        }
        _name_the_group(fields, event)
        return [Notice(event.callee, NoticeKind.INCOMING_CALL, event.call_id, fields)]
    if isinstance(event, CallAccepted):
        return [_ring_stopped(event, event.callee, event.call_id, RingStopReason.ANSWERED)]
    if isinstance(event, CallDeclined):
        return [_ring_stopped(event, event.callee, event.call_id, RingStopReason.DECLINED)]
    if isinstance(event, CallCancelled):
        return [_ring_stopped(event, event.callee, event.call_id, RingStopReason.CANCELLED)]
    if isinstance(event, CallMissed):
        return [
            _ring_stopped(event, event.callee, event.call_id, RingStopReason.MISSED),
            _missed(event, event.caller, event.callee, event.call_id, event.media),
        ]
    if isinstance(event, CallEnded):
        if event.callee is None:
            return []  # a group call: each invitee's own events stopped its ringing
        notices = [_ring_stopped(event, event.callee, event.call_id, RingStopReason.ENDED)]
        if event.reason in MISSED_END_REASONS:
            notices.append(_missed(event, event.caller, event.callee, event.call_id, event.media))
        return notices
    return []
