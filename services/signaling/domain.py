"""The call state machine: one transition table, and the call as a value object.

Every allowed step is listed in :data:`TRANSITIONS`; anything else raises
:class:`IllegalTransition` naming the current state. Pure: no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from shared.contracts import CallState, EndReason, MediaKind, RejectReason


class CallAction(StrEnum):
    """What can happen to a call. Who may do it is checked by the caller of :func:`step`."""

    AUTHORIZE = "authorize"
    """Policy allowed the call (``call_authorized``)."""
    REJECT = "reject"
    """Policy denied it (``call_rejected``)."""
    CALLEE_BUSY = "callee_busy"
    """The callee is already in an accepted or active call."""
    ACCEPT = "accept"
    DECLINE = "decline"
    CANCEL = "cancel"
    """The caller hung up before the call was answered."""
    RING_TIMEOUT = "ring_timeout"
    GLARE_WIN = "glare_win"
    """Both parties called each other; this call (the lesser id) survives and connects."""
    GLARE_LOSE = "glare_lose"
    MEDIA_CONNECTED = "media_connected"
    MEDIA_FAILED = "media_failed"
    HANGUP = "hangup"
    """Either party ended an answered call."""
    MOVE_MEDIA = "move_media"
    """The call's media node is draining or gone: its room moves to another node (the
    call stays what it is; a rejoin deadline starts)."""
    MEDIA_LOST = "media_lost"
    """The call's media node is gone and no other node can take it yet: the rejoin
    deadline starts, so a call nobody can rejoin ends ``media_timeout`` (no zombie); a node
    that appears in time takes it (MOVE_MEDIA)."""
    MEDIA_RESUMED = "media_resumed"
    """Media flows on the call's (new) node after a move: the rejoin deadline is over."""
    UPGRADE_VIDEO = "upgrade_video"
    """A party turned the camera on in an audio call: the call is a video call now."""


S = CallState
A = CallAction

TRANSITIONS: dict[tuple[CallState, CallAction], CallState] = {
    (S.REQUESTED, A.AUTHORIZE): S.RINGING,
    (S.REQUESTED, A.REJECT): S.REJECTED,
    (S.REQUESTED, A.CALLEE_BUSY): S.BUSY,
    (S.REQUESTED, A.CANCEL): S.CANCELLED,
    (S.REQUESTED, A.GLARE_WIN): S.ACCEPTED,
    (S.REQUESTED, A.GLARE_LOSE): S.CANCELLED,
    (S.RINGING, A.CALLEE_BUSY): S.BUSY,
    (S.RINGING, A.ACCEPT): S.ACCEPTED,
    (S.RINGING, A.DECLINE): S.DECLINED,
    (S.RINGING, A.CANCEL): S.CANCELLED,
    (S.RINGING, A.RING_TIMEOUT): S.MISSED,
    (S.RINGING, A.GLARE_WIN): S.ACCEPTED,
    (S.RINGING, A.GLARE_LOSE): S.CANCELLED,
    (S.ACCEPTED, A.MEDIA_CONNECTED): S.ACTIVE,
    (S.ACCEPTED, A.MEDIA_FAILED): S.ENDED,
    (S.ACCEPTED, A.HANGUP): S.ENDED,
    (S.ACTIVE, A.MEDIA_FAILED): S.ENDED,
    (S.ACTIVE, A.HANGUP): S.ENDED,
    (S.ACCEPTED, A.MOVE_MEDIA): S.ACCEPTED,
    (S.ACTIVE, A.MOVE_MEDIA): S.ACTIVE,
    (S.ACTIVE, A.MEDIA_RESUMED): S.ACTIVE,
    (S.ACCEPTED, A.MEDIA_LOST): S.ACCEPTED,
    (S.ACTIVE, A.MEDIA_LOST): S.ACTIVE,
    (S.ACCEPTED, A.UPGRADE_VIDEO): S.ACCEPTED,
    (S.ACTIVE, A.UPGRADE_VIDEO): S.ACTIVE,
}
"""(current state, action) -> next state. The only place transitions are allowed."""

END_REASONS: dict[CallAction, EndReason] = {
    A.REJECT: EndReason.REJECTED_BY_POLICY,
    A.CALLEE_BUSY: EndReason.BUSY,
    A.DECLINE: EndReason.DECLINED,
    A.CANCEL: EndReason.CANCELLED,
    A.RING_TIMEOUT: EndReason.MISSED,
    A.GLARE_LOSE: EndReason.CANCELLED,
    A.HANGUP: EndReason.USER_HANGUP,
    # MEDIA_FAILED carries its own reason (ice_failed | media_timeout).
}

LIVE_STATES = frozenset({S.REQUESTED, S.RINGING, S.ACCEPTED, S.ACTIVE})
"""States in which a call is not over (the complement of FINAL_STATES)."""
IN_CALL_STATES = frozenset({S.ACCEPTED, S.ACTIVE})
"""A party of a call in one of these is busy."""
SIGNAL_STATES = frozenset({S.RINGING, S.ACCEPTED, S.ACTIVE})
"""``call.signal`` is relayed only for calls in these states: never before policy allowed it."""


class AudioState(StrEnum):
    """``call.media_state``'s ``audio``: a party's microphone."""

    ON = "on"
    MUTED = "muted"


class VideoState(StrEnum):
    """``call.media_state``'s ``video``: a party's camera."""

    ON = "on"
    OFF = "off"


class IllegalTransition(Exception):
    """A step the table refuses; ``state`` is the call's current state."""

    def __init__(self, state: CallState, action: CallAction, call_id: str = "") -> None:
        self.state = state
        self.action = action
        self.call_id = call_id
        what = f"call {call_id} " if call_id else "call "
        super().__init__(f"cannot {action.value}: {what}is {state.value}")


def next_state(state: CallState, action: CallAction) -> CallState:
    """The state ``action`` leads to from ``state``, or IllegalTransition."""
    try:
        return TRANSITIONS[(state, action)]
    except KeyError:
        raise IllegalTransition(state, action) from None


def allowed(state: CallState, action: CallAction) -> bool:
    return (state, action) in TRANSITIONS


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


class Role(StrEnum):
    CALLER = "caller"
    CALLEE = "callee"


@dataclass(frozen=True, slots=True)
class Call:
    """One call, as stored. ``version`` grows by one with every committed change."""

    call_id: str
    caller: str
    callee: str
    media: MediaKind
    state: CallState
    created_at: datetime
    version: int = 0
    end_reason: EndReason | None = None
    reject_reason: RejectReason | None = None
    ring_deadline: datetime | None = None
    answered_at: datetime | None = None
    ended_at: datetime | None = None
    answered_device: str | None = None
    caller_device: str | None = None
    media_node: str | None = None
    media_url: str | None = None
    replaced_by: str | None = None
    rejoin_deadline: datetime | None = None
    """Set when the call's media moved: if media does not flow on the new node by then,
    the call ends ``media_timeout``."""

    def role_of(self, user: str) -> Role | None:
        if user == self.caller:
            return Role.CALLER
        if user == self.callee:
            return Role.CALLEE
        return None

    def visible_to(self, user: str) -> bool:
        """Only the parties see a call, and the callee only once it reached them: never
        before policy's verdict, never a call policy rejected (the caller's alone)."""
        if user == self.caller:
            return True
        if user != self.callee or self.state in (CallState.REQUESTED, CallState.REJECTED):
            return False
        return (
            self.ring_deadline is not None
            or self.answered_at is not None
            or self.state is CallState.BUSY
        )

    def other(self, user: str) -> str:
        return self.callee if user == self.caller else self.caller

    @property
    def is_final(self) -> bool:
        return self.state.is_final

    def duration_s(self, now: datetime | None = None) -> float:
        if self.answered_at is None:
            return 0.0
        end = self.ended_at or now or utcnow()
        return max(round((end - self.answered_at).total_seconds(), 3), 0.0)

    def step(
        self,
        action: CallAction,
        *,
        at: datetime,
        media_failure: EndReason | None = None,
        **changes: Any,
    ) -> Call:
        """The call after ``action``: the table decides the state; ``changes`` add fields."""
        try:
            new_state = next_state(self.state, action)
        except IllegalTransition:
            raise IllegalTransition(self.state, action, self.call_id) from None
        updates: dict[str, Any] = {"state": new_state, **changes}
        if new_state is CallState.ACCEPTED and self.answered_at is None:
            updates.setdefault("answered_at", at)  # answered once (not again by a move)
        if action in (A.MEDIA_CONNECTED, A.MEDIA_RESUMED) or new_state.is_final:
            updates["rejoin_deadline"] = None
        if new_state.is_final:
            updates["ended_at"] = at
            reason = media_failure if action is A.MEDIA_FAILED else END_REASONS.get(action)
            if reason is None:
                raise ValueError(f"{action.value} needs an end reason")
            updates["end_reason"] = reason
        return replace(self, **updates)

    def public(self, now: datetime | None = None) -> dict[str, Any]:
        """The call object of the API and the WebSocket (see docs/signaling.md)."""
        return {
            "call_id": self.call_id,
            "caller": self.caller,
            "callee": self.callee,
            "media": self.media.value,
            "state": self.state.value,
            "end_reason": self.end_reason.value if self.end_reason else None,
            "reject_reason": self.reject_reason.value if self.reject_reason else None,
            "created_at": iso(self.created_at),
            "ring_deadline": iso(self.ring_deadline),
            "answered_at": iso(self.answered_at),
            "ended_at": iso(self.ended_at),
            "answered_device": self.answered_device,
            "duration_s": self.duration_s(now),
            "replaced_by": self.replaced_by,
        }


def move_media(
    call: Call,
    *,
    leaving: str,
    node_id: str,
    media_url: str,
    at: datetime,
    rejoin_deadline: datetime,
) -> Call | None:
    """The call with its media on ``node_id`` instead of ``leaving``, or None when there
    is nothing to move: the call is not (or no longer) on ``leaving`` (another instance or
    request moved it first), or it is not in a call. However many race, one move."""
    if call.media_node != leaving or call.state not in IN_CALL_STATES:
        return None
    return call.step(
        A.MOVE_MEDIA,
        at=at,
        media_node=node_id,
        media_url=media_url,
        rejoin_deadline=rejoin_deadline,
    )


def media_lost(call: Call, *, node_id: str, at: datetime, rejoin_deadline: datetime) -> Call | None:
    """The call waiting for a node to replace its lost ``node_id``, the rejoin deadline
    running; None when there is nothing to do: the call is not on that node, not in a call,
    or its deadline already runs (it starts once, from the first time the loss is seen)."""
    if (
        call.media_node != node_id
        or call.state not in IN_CALL_STATES
        or call.rejoin_deadline is not None
    ):
        return None
    return call.step(A.MEDIA_LOST, at=at, rejoin_deadline=rejoin_deadline)


def media_connected_action(call: Call) -> CallAction:
    """What ``call_media_connected`` from the call's node means: the first media of an
    accepted call, or media again after a move; else the table refuses it (a duplicate)."""
    if call.state is S.ACTIVE and call.rejoin_deadline is not None:
        return A.MEDIA_RESUMED
    return A.MEDIA_CONNECTED


def upgrade_to_video(call: Call, *, at: datetime) -> Call | None:
    """The call as a video call, or None if it is one already (nothing to commit)."""
    if call.media is MediaKind.VIDEO:
        next_state(call.state, A.UPGRADE_VIDEO)  # an ended video call is still refused
        return None
    return call.step(A.UPGRADE_VIDEO, at=at, media=MediaKind.VIDEO)


def glare_winner(first: str, second: str) -> str:
    """The call that survives glare: the lesser call id (as Matrix does)."""
    return min(first, second)
