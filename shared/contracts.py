"""Event contracts: one pydantic model per event of CONTRACT.md, and the enums they use.

Every event has the envelope ``event_id`` (UUID), ``type``, ``version`` (int) and
``occurred_at`` (UTC). The event type is the routing key. A consumer tolerates fields
it does not know (a newer producer may add one) but refuses a missing or mistyped one.

Versions: each model's ``version`` default is the current one. An older payload is
upcast in one place, :data:`UPCASTERS`, before it is validated; see :func:`parse_event`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticUndefined

from shared.clock import utcnow
from shared.ids import CallId, GroupId, UserId

# --------------------------------------------------------------------------- enums


class MediaKind(StrEnum):
    AUDIO = "audio"
    VIDEO = "video"


class CallState(StrEnum):
    REQUESTED = "requested"
    RINGING = "ringing"
    ACCEPTED = "accepted"
    ACTIVE = "active"
    ENDED = "ended"
    REJECTED = "rejected"
    DECLINED = "declined"
    CANCELLED = "cancelled"
    MISSED = "missed"
    BUSY = "busy"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset(
    {
        CallState.ENDED,
        CallState.REJECTED,
        CallState.DECLINED,
        CallState.CANCELLED,
        CallState.MISSED,
        CallState.BUSY,
    }
)


class EndReason(StrEnum):
    USER_HANGUP = "user_hangup"
    DECLINED = "declined"
    CANCELLED = "cancelled"
    MISSED = "missed"
    BUSY = "busy"
    ANSWERED_ELSEWHERE = "answered_elsewhere"
    ICE_FAILED = "ice_failed"
    MEDIA_TIMEOUT = "media_timeout"
    REJECTED_BY_POLICY = "rejected_by_policy"


class RejectReason(StrEnum):
    """What a caller may be told about a denial (caller-safe)."""

    CALLER_NOT_PREMIUM = "caller_not_premium"
    NO_PRIOR_DM = "no_prior_dm"
    CALLEE_UNAVAILABLE = "callee_unavailable"
    SELF_CALL = "self_call"


class DenialDetail(StrEnum):
    """Why policy really denied a call: for logs, traces and support, never for the caller."""

    SELF_CALL = "self_call"
    CALLER_NOT_PREMIUM = "caller_not_premium"
    NO_PRIOR_DM = "no_prior_dm"
    CALLS_DISABLED = "calls_disabled"
    NOT_ALLOWED_BY_SETTINGS = "not_allowed_by_settings"
    CALLEE_BLOCKED_CALLER = "callee_blocked_caller"
    CALLER_BLOCKED_CALLEE = "caller_blocked_callee"
    NOT_A_MEMBER = "not_a_member"
    """A group call's starter is not (or no longer) a member of the group."""


class MediaFailure(StrEnum):
    ICE_FAILED = "ice_failed"
    MEDIA_TIMEOUT = "media_timeout"


class PeerConnection(StrEnum):
    """How one party's media reaches the call's node (``call.peer``'s ``connection``)."""

    RECONNECTING = "reconnecting"
    """Its packets stopped: it is rejoining (a network change, a node move); not an end."""
    CONNECTED = "connected"
    """Its media flows (again)."""


class MediaMoveReason(StrEnum):
    """Why a call's media moves to another node (``call.media``'s ``reason``)."""

    NODE_DRAINING = "node_draining"
    """Its node got SIGTERM (a rolling deploy): it forwards on until both parties left it."""
    NODE_LOST = "node_lost"
    """Its node stopped heartbeating (crashed, partitioned)."""


class ReportReason(StrEnum):
    SPAM = "spam"
    HARASSMENT = "harassment"
    IMPERSONATION = "impersonation"
    OTHER = "other"


class EventType(StrEnum):
    """Routing keys. Call events go to the ``calls`` exchange, platform facts to ``platform``."""

    CALL_REQUESTED = "call_requested"
    CALL_AUTHORIZED = "call_authorized"
    CALL_REJECTED = "call_rejected"
    CALL_RINGING = "call_ringing"
    CALL_ACCEPTED = "call_accepted"
    CALL_DECLINED = "call_declined"
    CALL_CANCELLED = "call_cancelled"
    CALL_MISSED = "call_missed"
    CALL_ENDED = "call_ended"
    CALL_MEDIA_CONNECTED = "call_media_connected"
    CALL_MEDIA_FAILED = "call_media_failed"
    CALL_REPORTED = "call_reported"
    CALL_MEDIA_PEER = "call_media_peer"
    MEDIA_NODE_DRAINING = "media_node_draining"
    CALL_PARTICIPANT_JOINED = "call_participant_joined"
    CALL_PARTICIPANT_LEFT = "call_participant_left"

    USER_UPDATED = "user.updated"
    FOLLOW_CREATED = "follow.created"
    FOLLOW_DELETED = "follow.deleted"
    CONTACT_ADDED = "contact.added"
    CONTACT_REMOVED = "contact.removed"
    BLOCK_CREATED = "block.created"
    BLOCK_DELETED = "block.deleted"
    DM_SENT = "dm.sent"
    GROUP_MEMBER_ADDED = "group.member_added"
    GROUP_MEMBER_REMOVED = "group.member_removed"
    GROUP_MESSAGE_SENT = "group.message_sent"


class Exchange(StrEnum):
    CALLS = "calls"
    PLATFORM = "platform"


# --------------------------------------------------------------------------- envelope


class Event(BaseModel):
    """The envelope every event shares."""

    model_config = ConfigDict(extra="ignore", frozen=True, use_enum_values=False)

    exchange: ClassVar[Exchange] = Exchange.CALLS

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    type: EventType
    version: int = 1
    occurred_at: datetime = Field(default_factory=utcnow)

    @field_validator("occurred_at")
    @classmethod
    def _aware_utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("occurred_at must carry a timezone (UTC ISO-8601)")
        return value.astimezone(UTC)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


class CallEvent(Event):
    """An event about one party of a call: the callee of a 1:1 call, or in a group call
    (``group`` set) one invitee, each invitee's own event."""

    call_id: CallId
    caller: UserId
    callee: UserId
    group: GroupId | None = None


class GroupCallEvent(Event):
    """A call event that names either the callee (a 1:1 call) or the group (a group call).

    ``callee`` is required for a 1:1 call, as it always was; a group call has ``group``
    and no callee (its invitees are listed where the event needs them)."""

    call_id: CallId
    caller: UserId
    callee: UserId | None = None
    group: GroupId | None = None

    @model_validator(mode="before")
    @classmethod
    def _names_one(cls, data: Any) -> Any:
        # Before the fields: a payload with neither is refused naming the callee, which is
        # what a 1:1 producer (every producer before group calls) left out.
        if isinstance(data, dict) and data.get("callee") is None and data.get("group") is None:
            raise ValueError("callee is missing: a call event names exactly one of callee or group")
        return data

    @model_validator(mode="after")
    def _callee_or_group(self) -> GroupCallEvent:
        if (self.callee is None) == (self.group is None):
            raise ValueError("a call event names exactly one of callee (1:1) or group")
        return self


class CallRequested(GroupCallEvent):
    """A call was placed. A group call lists its ``invitees``: every member of the group
    but the starter (``caller``), when it was placed; policy decides whom to ring."""

    type: Literal[EventType.CALL_REQUESTED] = EventType.CALL_REQUESTED
    version: int = 2
    media: MediaKind
    invitees: list[UserId] = Field(default_factory=list, max_length=256)


class CallAuthorized(GroupCallEvent):
    """Policy allowed the call. For a group call, ``ring`` is the invitees to ring (the
    starter is never told why the others are not: that is in policy's logs and traces)."""

    type: Literal[EventType.CALL_AUTHORIZED] = EventType.CALL_AUTHORIZED
    version: int = 2
    media: MediaKind
    ring: list[UserId] = Field(default_factory=list, max_length=256)


class CallRejected(GroupCallEvent):
    type: Literal[EventType.CALL_REJECTED] = EventType.CALL_REJECTED
    version: int = 2
    reason: RejectReason
    detail: DenialDetail | None = None
    """Internal: the real reason, for support. Signaling never forwards it to the caller."""


class CallRinging(CallEvent):
    """The call rings ``callee``'s devices; in a group call, one event per rung invitee
    (``callee`` is that invitee, ``group`` the conversation)."""

    type: Literal[EventType.CALL_RINGING] = EventType.CALL_RINGING
    version: int = 2
    media: MediaKind
    ring_deadline: datetime


class CallAccepted(CallEvent):
    type: Literal[EventType.CALL_ACCEPTED] = EventType.CALL_ACCEPTED
    version: int = 2
    device_id: str | None
    """The device that answered; null when none is known (a glare whose losing call named
    no device): then every device of the callee has stopped ringing."""


class CallDeclined(CallEvent):
    type: Literal[EventType.CALL_DECLINED] = EventType.CALL_DECLINED
    version: int = 2


class CallCancelled(CallEvent):
    type: Literal[EventType.CALL_CANCELLED] = EventType.CALL_CANCELLED
    version: int = 2


class CallMissed(CallEvent):
    """``callee`` never answered; in a group call, one event per invitee who never joined."""

    type: Literal[EventType.CALL_MISSED] = EventType.CALL_MISSED
    version: int = 2
    media: MediaKind


class CallEnded(GroupCallEvent):
    """The call is over. A group call's ends with its last participant (``group`` set,
    no callee); ``duration_s`` is the call's, from the first answer."""

    type: Literal[EventType.CALL_ENDED] = EventType.CALL_ENDED
    version: int = 3
    reason: EndReason
    duration_s: float = Field(ge=0)
    media: MediaKind | None = None
    """What the call was when it ended (``video`` once upgraded). Signaling always sets it;
    it is null only in a call_ended from a producer that predates it (some v2 ones), which
    upcasting cannot invent (so a missed_call made from it says ``media: null``)."""


class CallMediaConnected(Event):
    type: Literal[EventType.CALL_MEDIA_CONNECTED] = EventType.CALL_MEDIA_CONNECTED
    call_id: CallId
    node_id: str


class CallMediaFailed(Event):
    type: Literal[EventType.CALL_MEDIA_FAILED] = EventType.CALL_MEDIA_FAILED
    call_id: CallId
    node_id: str
    reason: MediaFailure


class CallMediaPeer(Event):
    """The call's node saw one party's media stop (``reconnecting``) or flow again
    (``connected``). Signaling tells the other party (``call.peer``)."""

    type: Literal[EventType.CALL_MEDIA_PEER] = EventType.CALL_MEDIA_PEER
    call_id: CallId
    node_id: str
    user: UserId
    connection: PeerConnection


class MediaNodeDraining(Event):
    """A media node got SIGTERM: it takes no new rooms, and asks for its calls to be moved
    (``call_ids``: the calls it hosts now). It forwards until both parties left it."""

    type: Literal[EventType.MEDIA_NODE_DRAINING] = EventType.MEDIA_NODE_DRAINING
    node_id: str
    call_ids: list[CallId]


class CallParticipantEvent(Event):
    """A participant joined or left a call (group calls; media drops a leaver's session)."""

    call_id: CallId
    user: UserId
    group: GroupId | None = None


class CallParticipantJoined(CallParticipantEvent):
    type: Literal[EventType.CALL_PARTICIPANT_JOINED] = EventType.CALL_PARTICIPANT_JOINED


class CallParticipantLeft(CallParticipantEvent):
    type: Literal[EventType.CALL_PARTICIPANT_LEFT] = EventType.CALL_PARTICIPANT_LEFT


class CallReported(Event):
    type: Literal[EventType.CALL_REPORTED] = EventType.CALL_REPORTED
    call_id: CallId
    reporter: UserId
    reported_user: UserId
    reason: ReportReason


# --------------------------------------------------------------------------- platform facts


class PlatformEvent(Event):
    exchange: ClassVar[Exchange] = Exchange.PLATFORM


class UserUpdated(PlatformEvent):
    type: Literal[EventType.USER_UPDATED] = EventType.USER_UPDATED
    user_id: UserId
    premium: bool
    verified: bool


class RelationEvent(PlatformEvent):
    """``user_id`` follows / has in contacts / blocks ``other_id``."""

    user_id: UserId
    other_id: UserId


class FollowCreated(RelationEvent):
    type: Literal[EventType.FOLLOW_CREATED] = EventType.FOLLOW_CREATED


class FollowDeleted(RelationEvent):
    type: Literal[EventType.FOLLOW_DELETED] = EventType.FOLLOW_DELETED


class ContactAdded(RelationEvent):
    type: Literal[EventType.CONTACT_ADDED] = EventType.CONTACT_ADDED


class ContactRemoved(RelationEvent):
    type: Literal[EventType.CONTACT_REMOVED] = EventType.CONTACT_REMOVED


class BlockCreated(RelationEvent):
    type: Literal[EventType.BLOCK_CREATED] = EventType.BLOCK_CREATED


class BlockDeleted(RelationEvent):
    type: Literal[EventType.BLOCK_DELETED] = EventType.BLOCK_DELETED


class DmSent(PlatformEvent):
    type: Literal[EventType.DM_SENT] = EventType.DM_SENT
    sender: UserId
    recipient: UserId


class GroupMemberEvent(PlatformEvent):
    """``user_id`` joined (``group.member_added``) or left (``group.member_removed``) the
    group DM conversation ``group_id``."""

    group_id: GroupId
    user_id: UserId


class GroupMemberAdded(GroupMemberEvent):
    type: Literal[EventType.GROUP_MEMBER_ADDED] = EventType.GROUP_MEMBER_ADDED


class GroupMemberRemoved(GroupMemberEvent):
    type: Literal[EventType.GROUP_MEMBER_REMOVED] = EventType.GROUP_MEMBER_REMOVED


class GroupMessageSent(PlatformEvent):
    """``sender`` posted in the group ``group_id`` (the group's analogue of a DM)."""

    type: Literal[EventType.GROUP_MESSAGE_SENT] = EventType.GROUP_MESSAGE_SENT
    group_id: GroupId
    sender: UserId


# --------------------------------------------------------------------------- registry


def _registry() -> dict[EventType, type[Event]]:
    registry: dict[EventType, type[Event]] = {}
    pending = list(Event.__subclasses__())
    while pending:
        model = pending.pop()
        pending += model.__subclasses__()
        event_type = model.model_fields["type"].default
        if event_type is PydanticUndefined:
            continue  # a base (CallEvent, PlatformEvent, ...): no type of its own
        if event_type in registry:
            raise TypeError(
                f"{model.__name__} and {registry[event_type].__name__} share {event_type}"
            )
        registry[event_type] = model
    return registry


EVENT_MODELS: dict[EventType, type[Event]] = _registry()
"""Event type -> its model, derived from the classes above: a new event is a new class
(with its ``type`` literal and a member of :class:`EventType`), nothing else to list."""


def current_version(event_type: EventType) -> int:
    default = EVENT_MODELS[event_type].model_fields["version"].default
    assert isinstance(default, int)
    return default


Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


def _call_ended_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 (pre-release) carried ``duration_ms`` as an int; v2 carries ``duration_s``."""
    out = dict(payload)
    duration_ms = out.pop("duration_ms", 0)
    out["duration_s"] = round(float(duration_ms) / 1000.0, 3)
    return out


def _one_to_one(payload: dict[str, Any]) -> dict[str, Any]:
    """Before group calls (v1; ``call_ended`` v2) every call was 1:1: no ``group``."""
    return {**payload, "group": None}


UPCASTERS: dict[tuple[EventType, int], Upcaster] = {
    # (type, from_version) -> payload of from_version + 1
    (EventType.CALL_ENDED, 1): _call_ended_v1_to_v2,
    # media passes as it is: a v2 that carried it keeps it, one that did not stays null.
    (EventType.CALL_ENDED, 2): _one_to_one,
    (EventType.CALL_REQUESTED, 1): _one_to_one,
    (EventType.CALL_AUTHORIZED, 1): _one_to_one,
    (EventType.CALL_REJECTED, 1): _one_to_one,
    (EventType.CALL_RINGING, 1): _one_to_one,
    (EventType.CALL_MISSED, 1): _one_to_one,
    (EventType.CALL_ACCEPTED, 1): _one_to_one,
    (EventType.CALL_DECLINED, 1): _one_to_one,
    (EventType.CALL_CANCELLED, 1): _one_to_one,
}
"""The one place old versions become new ones. Add an entry when a version is bumped."""


class EventDecodeError(ValueError):
    """A payload that can never become a valid event (poison): wrong JSON, type or fields."""


def upcast(payload: dict[str, Any]) -> dict[str, Any]:
    try:
        event_type = EventType(payload["type"])
    except (KeyError, ValueError) as exc:
        raise EventDecodeError(f"unknown or missing event type: {payload.get('type')!r}") from exc
    version = payload.get("version", 1)
    if not isinstance(version, int) or version < 1:
        raise EventDecodeError(f"bad version {version!r} for {event_type}")
    target = current_version(event_type)
    if version > target:
        # A newer producer: its extra fields are tolerated, the known ones must still parse.
        return payload
    while version < target:
        step = UPCASTERS.get((event_type, version))
        if step is None:
            raise EventDecodeError(f"no upcaster for {event_type} v{version}")
        payload = step(payload)
        version += 1
        payload["version"] = version
    return payload


def parse_event(raw: bytes | str | dict[str, Any]) -> Event:
    """Decode, upcast and validate one event. Raises EventDecodeError with a clear message."""
    if isinstance(raw, dict):
        payload = dict(raw)
    else:
        try:
            payload = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EventDecodeError(f"event is not JSON: {exc}") from exc
        if not isinstance(payload, dict):
            raise EventDecodeError("event must be a JSON object")
    payload = upcast(payload)
    model = EVENT_MODELS[EventType(payload["type"])]
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise EventDecodeError(f"invalid {payload['type']}: {exc}") from exc
