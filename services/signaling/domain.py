"""The call state machine: two rule tables, and the call with its participants as values.

:data:`CALL_RULES` (the call's states; :data:`TRANSITIONS` is its state column) and
:data:`PARTICIPANT_RULES` (each participant's) list every allowed step: the action, who
may take it (:class:`Actor`), the next state and the events it emits; anything else raises
:class:`IllegalTransition` naming the current state. ``CallState``'s values are the wire's
(shared.contracts, used as is); which are live, in a call or final is decided here. The
decisions over these tables are decisions.py. Pure: no I/O here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, Generic, TypeVar

from shared.clock import iso, utcnow
from shared.contracts import CallState, EndReason, EventType, MediaKind, RejectReason


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


class Actor(StrEnum):
    """Who takes an action (each rule names who may)."""

    CALLER = "caller"
    """The 1:1 caller, the group call's starter."""
    CALLEE = "callee"
    """The 1:1 callee, a group call's invitee (a member when it was placed)."""
    MEMBER = "member"
    """Any current member of the call's group (group calls only)."""
    POLICY = "policy"
    MEDIA = "media"
    """The call's media node (its events)."""
    TIMER = "timer"
    """A server deadline (ring, rejoin)."""
    SYSTEM = "system"
    """Signaling itself, on what it read (busy, glare, a node move)."""


S = CallState
A = CallAction
_PARTIES = frozenset({Actor.CALLER, Actor.CALLEE, Actor.MEMBER})


State = TypeVar("State", bound=StrEnum)


@dataclass(frozen=True, slots=True)
class Rule(Generic[State]):
    """One allowed step of a call (``Rule[CallState]``) or of a participant in it
    (``Rule[ParticipantState]``): the state it leads to, who may take it, and the events it
    emits (a 1:1 call's; a group call's where they differ)."""

    to: State
    by: frozenset[Actor]
    emits: tuple[EventType, ...] = ()
    group_emits: tuple[EventType, ...] | None = None
    """None: the same as ``emits``. A call's per-invitee events are the participant
    table's; ``call_participant_*`` are published for group calls only."""


def _rule(
    to: State,
    *by: Actor,
    emits: tuple[EventType, ...] = (),
    group: tuple[EventType, ...] | None = None,
) -> Rule[State]:
    return Rule(to, frozenset(by), emits, group)


E = EventType
_ENDED = (E.CALL_ENDED,)

CALL_RULES: dict[tuple[CallState, CallAction], Rule[CallState]] = {
    (S.REQUESTED, A.AUTHORIZE): _rule(S.RINGING, Actor.POLICY, emits=(E.CALL_RINGING,), group=()),
    (S.REQUESTED, A.REJECT): _rule(S.REJECTED, Actor.POLICY),
    (S.REQUESTED, A.CALLEE_BUSY): _rule(S.BUSY, Actor.SYSTEM, emits=_ENDED),
    (S.REQUESTED, A.CANCEL): _rule(S.CANCELLED, Actor.CALLER, emits=(E.CALL_CANCELLED,), group=()),
    (S.REQUESTED, A.GLARE_WIN): _rule(S.ACCEPTED, Actor.SYSTEM, emits=(E.CALL_ACCEPTED,)),
    (S.REQUESTED, A.GLARE_LOSE): _rule(S.CANCELLED, Actor.SYSTEM, emits=(E.CALL_CANCELLED,)),
    (S.RINGING, A.CALLEE_BUSY): _rule(S.BUSY, Actor.SYSTEM, emits=_ENDED),
    (S.RINGING, A.ACCEPT): _rule(
        S.ACCEPTED, Actor.CALLEE, Actor.MEMBER, emits=(E.CALL_ACCEPTED,), group=()
    ),
    (S.RINGING, A.DECLINE): _rule(S.DECLINED, Actor.CALLEE, emits=(E.CALL_DECLINED,)),
    (S.RINGING, A.CANCEL): _rule(S.CANCELLED, Actor.CALLER, emits=(E.CALL_CANCELLED,), group=()),
    (S.RINGING, A.RING_TIMEOUT): _rule(S.MISSED, Actor.TIMER, emits=(E.CALL_MISSED,), group=_ENDED),
    (S.RINGING, A.GLARE_WIN): _rule(S.ACCEPTED, Actor.SYSTEM, emits=(E.CALL_ACCEPTED,)),
    (S.RINGING, A.GLARE_LOSE): _rule(S.CANCELLED, Actor.SYSTEM, emits=(E.CALL_CANCELLED,)),
    (S.ACCEPTED, A.MEDIA_CONNECTED): _rule(S.ACTIVE, Actor.MEDIA),
    (S.ACCEPTED, A.MEDIA_FAILED): _rule(S.ENDED, Actor.MEDIA, Actor.TIMER, emits=_ENDED),
    (S.ACCEPTED, A.HANGUP): _rule(S.ENDED, *_PARTIES, emits=_ENDED),
    (S.ACTIVE, A.MEDIA_FAILED): _rule(S.ENDED, Actor.MEDIA, Actor.TIMER, emits=_ENDED),
    (S.ACTIVE, A.HANGUP): _rule(S.ENDED, *_PARTIES, emits=_ENDED),
    (S.ACCEPTED, A.MOVE_MEDIA): _rule(S.ACCEPTED, Actor.SYSTEM),
    (S.ACTIVE, A.MOVE_MEDIA): _rule(S.ACTIVE, Actor.SYSTEM),
    (S.ACTIVE, A.MEDIA_RESUMED): _rule(S.ACTIVE, Actor.MEDIA),
    (S.ACCEPTED, A.MEDIA_LOST): _rule(S.ACCEPTED, Actor.SYSTEM),
    (S.ACTIVE, A.MEDIA_LOST): _rule(S.ACTIVE, Actor.SYSTEM),
    (S.ACCEPTED, A.UPGRADE_VIDEO): _rule(S.ACCEPTED, *_PARTIES),
    (S.ACTIVE, A.UPGRADE_VIDEO): _rule(S.ACTIVE, *_PARTIES),
}
"""The call's table: (current state, action) -> the rule. The only place call-level
transitions are allowed. In a group call, ``accept`` is the first answer besides the
starter (an invitee's accept or a member's join), ``cancel`` the starter leaving before
it, ``hangup`` the last joined participant leaving, ``ring_timeout`` the deadline with
nobody answered; every other participant change leaves the call's state alone (the
participant table, :data:`PARTICIPANT_RULES`)."""

TRANSITIONS: dict[tuple[CallState, CallAction], CallState] = {
    key: rule.to for key, rule in CALL_RULES.items()
}
"""(current state, action) -> next state: :data:`CALL_RULES` without the rest."""

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
"""States in which a call is not over (the complement of :data:`FINAL_STATES`)."""
FINAL_STATES = frozenset(set(CallState) - LIVE_STATES)
"""The call's states from which no rule leads anywhere."""
IN_CALL_STATES = frozenset({S.ACCEPTED, S.ACTIVE})
"""A call answered and not over: its joined participants are busy."""
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
    """A step a table refuses; ``state`` is the call's current state, ``participant``
    the acting participant's when the participant table refused it."""

    def __init__(
        self,
        state: CallState,
        action: CallAction | ParticipantAction | str,
        call_id: str = "",
        *,
        participant: ParticipantState | None = None,
    ) -> None:
        self.state = state
        self.action = action
        self.call_id = call_id
        self.participant = participant
        what = f"call {call_id} " if call_id else "call "
        name = action.value if isinstance(action, StrEnum) else action
        tail = f" (you are {participant.value})" if participant is not None else ""
        super().__init__(f"cannot {name}: {what}is {state.value}{tail}")


class CallFull(Exception):
    """The call holds ``GROUP_CALL_MAX_PARTICIPANTS`` joined participants already."""

    def __init__(self, call_id: str, limit: int) -> None:
        super().__init__(f"call {call_id} is full ({limit} participants)")
        self.call_id = call_id
        self.limit = limit


def next_state(state: CallState, action: CallAction) -> CallState:
    """The state ``action`` leads to from ``state``, or IllegalTransition."""
    try:
        return TRANSITIONS[(state, action)]
    except KeyError:
        raise IllegalTransition(state, action) from None


def allowed(state: CallState, action: CallAction) -> bool:
    return (state, action) in TRANSITIONS


def call_rule(
    state: CallState, action: CallAction, actors: frozenset[Actor], call_id: str = ""
) -> Rule[CallState]:
    """The rule for ``action`` from ``state`` if one of ``actors`` may take it, else
    IllegalTransition naming the state."""
    rule = CALL_RULES.get((state, action))
    if rule is None or not (rule.by & actors):
        raise IllegalTransition(state, action, call_id)
    return rule


class Role(StrEnum):
    """A participant's place in the call (fixed when it is recorded)."""

    CALLER = "caller"
    """The 1:1 caller, the group call's starter."""
    CALLEE = "callee"
    """The 1:1 callee, a group invitee (a member when the call was placed)."""
    MEMBER = "member"
    """A group member who was not one when the call was placed (joins only)."""


class ParticipantState(StrEnum):
    INVITED = "invited"
    """Named at placement; policy has not answered yet (or rejected the call)."""
    RINGING = "ringing"
    JOINED = "joined"
    LEFT = "left"
    DECLINED = "declined"
    MISSED = "missed"
    """Rung and never answered: at the ring deadline, when the call ended, or when the
    starter cancelled it."""
    NOT_RUNG = "not_rung"
    """Policy did not ring them, they were busy (no call-waiting), or a member who was
    never an invitee; they may join."""


class ParticipantAction(StrEnum):
    RING = "ring"
    SKIP = "skip"
    """Not rung: policy left them out, or they are busy."""
    ACCEPT = "accept"
    """An invitee answers on one device (also ``join`` while it rings for them)."""
    JOIN = "join"
    DECLINE = "decline"
    LEAVE = "leave"
    MISS = "miss"
    """The ring deadline passed, or the call ended, while it rang for them."""
    CANCEL = "cancel"
    """The starter left before anyone answered, while it rang for them."""
    END = "end"
    """The call ended (media failed, a rejoin deadline, the last one left) while joined."""


P = ParticipantState
PA = ParticipantAction

_JOINERS = (Actor.CALLEE, Actor.MEMBER)
_REJOIN = (E.CALL_PARTICIPANT_JOINED,)

PARTICIPANT_RULES: dict[tuple[ParticipantState, ParticipantAction], Rule[ParticipantState]] = {
    (P.INVITED, PA.RING): _rule(P.RINGING, Actor.POLICY, emits=(E.CALL_RINGING,)),
    (P.INVITED, PA.SKIP): _rule(P.NOT_RUNG, Actor.POLICY, Actor.SYSTEM),
    (P.RINGING, PA.ACCEPT): _rule(
        P.JOINED,
        Actor.CALLEE,
        emits=(E.CALL_ACCEPTED,),
        group=(E.CALL_ACCEPTED, E.CALL_PARTICIPANT_JOINED),
    ),
    (P.RINGING, PA.DECLINE): _rule(P.DECLINED, Actor.CALLEE, emits=(E.CALL_DECLINED,)),
    (P.RINGING, PA.MISS): _rule(P.MISSED, Actor.TIMER, Actor.SYSTEM, emits=(E.CALL_MISSED,)),
    (P.RINGING, PA.CANCEL): _rule(P.MISSED, Actor.CALLER, emits=(E.CALL_CANCELLED,)),
    (P.NOT_RUNG, PA.JOIN): _rule(P.JOINED, *_JOINERS, emits=(), group=_REJOIN),
    (P.DECLINED, PA.JOIN): _rule(P.JOINED, *_JOINERS, emits=(), group=_REJOIN),
    (P.MISSED, PA.JOIN): _rule(P.JOINED, *_JOINERS, emits=(), group=_REJOIN),
    (P.LEFT, PA.JOIN): _rule(P.JOINED, Actor.CALLER, *_JOINERS, emits=(), group=_REJOIN),
    (P.JOINED, PA.LEAVE): _rule(P.LEFT, *_PARTIES, emits=(), group=(E.CALL_PARTICIPANT_LEFT,)),
    (P.JOINED, PA.END): _rule(P.LEFT, Actor.SYSTEM, Actor.MEDIA, Actor.TIMER),
}
"""Each participant's table: (their state, action) -> the rule. ``join`` is for a member
who is not in the call (not rung, declined, missed, left); in a 1:1 call nobody joins (the
callee accepts), and a participant who left a 1:1 call left it for good (it ended)."""


def participant_rule(
    call: Call,
    user: str,
    action: ParticipantAction,
    actors: frozenset[Actor],
) -> Rule[ParticipantState]:
    """The participant table's rule for ``user`` (a member not recorded yet counts as
    ``not_rung``), or IllegalTransition naming the call's and the participant's state."""
    state = call.participant(user).state
    rule = PARTICIPANT_RULES.get((state, action))
    if rule is None or not (rule.by & actors) or (action is PA.JOIN and call.group is None):
        raise IllegalTransition(call.state, action, call.call_id, participant=state)
    return rule


@dataclass(frozen=True, slots=True)
class Participant:
    """One user's part in a call."""

    state: ParticipantState
    role: Role
    joined_at: datetime | None = None
    """When they first joined."""
    left_at: datetime | None = None
    """When they last left."""
    device: str | None = None
    """Their device in the call: the one that answered or joined (the caller's: the one
    they called from); None: not known, so every device of theirs."""
    rung: bool = False
    """The call rang for them (history, visibility)."""
    since: datetime | None = None
    """While joined: the start of this stretch of presence."""
    present_s: float = 0.0
    """Their presence before ``since`` (earlier stretches, summed)."""

    def presence_s(self, now: datetime) -> float:
        """Their own time in the call: every stretch they were joined, summed."""
        total = self.present_s
        if self.state is P.JOINED and self.since is not None:
            total += max((now - self.since).total_seconds(), 0.0)
        return round(total, 3)

    def joined(self, at: datetime, device: str | None) -> Participant:
        return replace(
            self,
            state=P.JOINED,
            joined_at=self.joined_at or at,
            since=at,
            device=device if device is not None else self.device,
        )

    def left(self, at: datetime, state: ParticipantState = P.LEFT) -> Participant:
        stretch = (at - self.since).total_seconds() if self.since is not None else 0.0
        return replace(
            self,
            state=state,
            left_at=at,
            since=None,
            present_s=round(self.present_s + max(stretch, 0.0), 3),
        )

    def encode(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "role": self.role.value,
            "joined_at": iso(self.joined_at),
            "left_at": iso(self.left_at),
            "device": self.device,
            "rung": self.rung,
            "since": iso(self.since),
            "present_s": self.present_s,
        }

    @classmethod
    def decode(cls, raw: dict[str, Any]) -> Participant:
        def when(name: str) -> datetime | None:
            value = raw.get(name)
            return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None

        return cls(
            state=ParticipantState(raw["state"]),
            role=Role(raw["role"]),
            joined_at=when("joined_at"),
            left_at=when("left_at"),
            device=raw.get("device"),
            rung=bool(raw.get("rung", False)),
            since=when("since"),
            present_s=float(raw.get("present_s", 0.0)),
        )


def one_to_one_participants(call: Call) -> dict[str, Participant]:
    """The two participants a 1:1 call's own fields imply (a call stored before
    participants were, or built without them)."""
    assert call.callee is not None
    answered, end = call.answered_at, call.ended_at
    over = call.state in FINAL_STATES
    caller = Participant(
        P.LEFT if over else P.JOINED,
        Role.CALLER,
        joined_at=call.created_at,
        left_at=end if over else None,
        device=call.caller_device,
        since=None if over else call.created_at,
        present_s=round(((end or call.created_at) - call.created_at).total_seconds(), 3)
        if over
        else 0.0,
    )
    rang = call.ring_deadline is not None or answered is not None
    callee_state = {
        S.REQUESTED: P.INVITED,
        S.REJECTED: P.INVITED,
        S.RINGING: P.RINGING,
        S.ACCEPTED: P.JOINED,
        S.ACTIVE: P.JOINED,
        S.DECLINED: P.DECLINED,
        S.MISSED: P.MISSED,
        S.BUSY: P.NOT_RUNG,
        S.CANCELLED: P.MISSED if rang else P.INVITED,
        S.ENDED: P.LEFT if answered else P.MISSED,
    }[call.state]
    callee = Participant(
        callee_state,
        Role.CALLEE,
        joined_at=answered,
        left_at=end if answered and over else None,
        device=call.answered_device,
        rung=rang,
        since=answered if callee_state is P.JOINED else None,
        present_s=call.duration_s(end) if answered and over else 0.0,
    )
    return {call.caller: caller, call.callee: callee}


@dataclass(frozen=True, slots=True)
class Call:
    """One call, as stored. ``version`` grows by one with every committed change.

    A 1:1 call has ``callee`` and two participants; a group call has ``group``, no
    callee, and a participant for the starter (``caller``) and each member it concerns."""

    call_id: str
    caller: str
    callee: str | None
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
    """1:1: the callee's answering device (None: not known, e.g. glare from a call placed
    without ``device_id``). A group call's devices are its participants'."""
    caller_device: str | None = None
    media_node: str | None = None
    media_url: str | None = None
    replaced_by: str | None = None
    rejoin_deadline: datetime | None = None
    """Set when the call's media moved: if media does not flow on the new node by then,
    the call ends ``media_timeout``."""
    group: str | None = None
    participants: Mapping[str, Participant] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.callee is None) == (self.group is None):
            raise ValueError("a call has exactly one of callee (1:1) or group")
        if not self.participants and self.group is None:
            object.__setattr__(self, "participants", one_to_one_participants(self))

    @property
    def peer(self) -> str:
        """A 1:1 call's callee (never asked of a group call)."""
        assert self.callee is not None, "a group call has no callee"
        return self.callee

    def participant(self, user: str) -> Participant:
        """``user``'s participant; a member the call does not record is ``not_rung``."""
        found = self.participants.get(user)
        return found if found is not None else Participant(P.NOT_RUNG, Role.MEMBER)

    def joined(self) -> list[str]:
        """The users joined now, in a stable order."""
        return sorted(u for u, p in self.participants.items() if p.state is P.JOINED)

    def ringing(self) -> list[str]:
        return sorted(u for u, p in self.participants.items() if p.state is P.RINGING)

    def device_of(self, user: str) -> str | None:
        if self.group is None:
            return self.answered_device if user == self.callee else self.caller_device
        return self.participant(user).device

    def actors(self, user: str, *, member: bool = False) -> frozenset[Actor]:
        """What ``user`` may act as in this call (``member``: a current member of its group,
        as read; a participant who joined as a member acts as one in the call)."""
        found: set[Actor] = set()
        if user == self.caller:
            found.add(Actor.CALLER)
        elif user == self.callee or self.participant(user).role is Role.CALLEE:
            found.add(Actor.CALLEE)
        joined_as_member = self.participant(user).role is Role.MEMBER and user in self.participants
        if self.group is not None and (member or joined_as_member):
            found.add(Actor.MEMBER)
        return frozenset(found)

    def role_of(self, user: str) -> Role | None:
        if user == self.caller:
            return Role.CALLER
        if user == self.callee:
            return Role.CALLEE
        if user in self.participants:
            return self.participants[user].role
        return None

    def visible_to(self, user: str) -> bool:
        """Only the parties see a call, and the callee only once it reached them: never
        before policy's verdict, never a call policy rejected (the caller's alone). A group
        call: its starter, the invitees it rang, and anyone who joined it."""
        if user == self.caller:
            return True
        if self.group is not None:
            found = self.participants.get(user)
            return found is not None and (found.rung or found.joined_at is not None)
        if user != self.callee or self.state in (CallState.REQUESTED, CallState.REJECTED):
            return False
        return (
            self.ring_deadline is not None
            or self.answered_at is not None
            or self.state is CallState.BUSY
        )

    def other(self, user: str) -> str:
        """A 1:1 call's other party."""
        return self.peer if user == self.caller else self.caller

    def others_joined(self, user: str) -> list[str]:
        """Every joined participant but ``user`` (a 1:1 call in progress: the other party)."""
        if self.group is None:
            return [self.other(user)]
        return [u for u in self.joined() if u != user]

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
        if action in (A.MEDIA_CONNECTED, A.MEDIA_RESUMED) or new_state in FINAL_STATES:
            updates["rejoin_deadline"] = None
        if new_state in FINAL_STATES:
            updates["ended_at"] = at
            reason = media_failure if action is A.MEDIA_FAILED else END_REASONS.get(action)
            if reason is None:
                raise ValueError(f"{action.value} needs an end reason")
            updates["end_reason"] = reason
        return replace(self, **updates)

    def text_fields(self) -> dict[str, str | None]:
        """Its ids, media and states as text: the call object's and the stored hash's."""
        return {
            "call_id": self.call_id,
            "caller": self.caller,
            "callee": self.callee,
            "group": self.group,
            "media": self.media.value,
            "state": self.state.value,
            "end_reason": self.end_reason.value if self.end_reason else None,
            "reject_reason": self.reject_reason.value if self.reject_reason else None,
        }

    def public(self, now: datetime | None = None) -> dict[str, Any]:
        """The call object of the API and the WebSocket (see docs/signaling.md)."""
        return {
            **self.text_fields(),
            "created_at": iso(self.created_at),
            "ring_deadline": iso(self.ring_deadline),
            "answered_at": iso(self.answered_at),
            "ended_at": iso(self.ended_at),
            "answered_device": self.answered_device,
            "duration_s": self.duration_s(now),
            "replaced_by": self.replaced_by,
            "participants": [
                {
                    "user": user,
                    "state": part.state.value,
                    "joined_at": iso(part.joined_at),
                    "left_at": iso(part.left_at),
                }
                for user, part in sorted(self.participants.items())
            ],
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
