"""Every decision about a call, as a pure function of the call, the time, and what was
read for it (live calls for busy and glare, group membership, a media node).

Each returns a :class:`Step`: the calls to write (with the versions read), the calls whose
versions must not have changed, the events, the notices for devices (some carrying a
media grant the service mints), and a typed result. The service (calls.py) reads, calls
the decision, commits the step atomically, and retries all three on a conflict; nothing
here does I/O, so the rules are unit-tested without Redis (tests/test_signaling_domain.py).
Who may take which step, and what it leads to, is the two tables of domain.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Generic, TypeVar

from services.signaling.domain import (
    FINAL_STATES,
    IN_CALL_STATES,
    LIVE_STATES,
    SIGNAL_STATES,
    Actor,
    Call,
    CallAction,
    CallFull,
    IllegalTransition,
    Participant,
    ParticipantAction,
    ParticipantState,
    Role,
    call_rule,
    glare_winner,
    media_connected_action,
    media_lost,
    move_media,
    participant_rule,
    upgrade_to_video,
)
from shared.contracts import (
    CallAccepted,
    CallCancelled,
    CallDeclined,
    CallEnded,
    CallMissed,
    CallParticipantJoined,
    CallParticipantLeft,
    CallRequested,
    CallRinging,
    CallState,
    EndReason,
    Event,
    MediaKind,
    MediaMoveReason,
    PeerConnection,
    RejectReason,
)
from shared.media_registry import MediaNode

S = CallState
A = CallAction
P = ParticipantState
PA = ParticipantAction
T = TypeVar("T")


class NotFound(Exception):
    """Not a call of this user's (or none at all): 404, never a membership oracle."""


class NoMediaNode(Exception):
    """The step needs a media node and none is live."""


class BadSignal(ValueError):
    """A ``call.signal`` the service cannot route (e.g. no ``to`` in a group call)."""


@dataclass(frozen=True, slots=True)
class Notice:
    """One message for one user's devices (all, only ``devices``, all but
    ``except_devices``, or the ``newest`` few). ``grant``: the service adds the media
    fields of a fresh grant for this user on the call's node (one grant per user a step)."""

    user: str
    message: dict[str, Any]
    devices: frozenset[str] | None = None
    except_devices: frozenset[str] = frozenset()
    newest: int | None = None
    grant: bool = False


@dataclass(frozen=True, slots=True)
class Write:
    before: Call | None
    after: Call


@dataclass
class Step(Generic[T]):
    """What one decision commits (``writes``, with ``checks`` unchanged, and ``events`` in
    the same commit) and what happens after it (``notices``); ``result`` for the caller."""

    result: T
    writes: list[Write] = field(default_factory=list)
    checks: list[Call] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)

    @property
    def changes(self) -> bool:
        return bool(self.writes or self.events)


@dataclass(frozen=True, slots=True)
class Granted:
    """The user is in the call now: the service answers with their media grant."""

    user: str


@dataclass(frozen=True, slots=True)
class Again:
    """The user is in the call on this device already: a fresh grant, nothing committed."""


class Outcome(StrEnum):
    """What a deadline did: fired, is not due yet (keep it), or has nothing to do (drop it)."""

    FIRED = "fired"
    NOT_DUE = "not_due"
    NOTHING = "nothing"


@dataclass(frozen=True, slots=True)
class Moved:
    moved: Call | None
    """The call on its new node (None: nothing moved)."""
    stranded: bool = False
    """No node could take it."""


# ---------------------------------------------------------------------------- messages


def state_message(call: Call, now: datetime, **extra: Any) -> dict[str, Any]:
    return {"type": "call.state", **call.public(now), "answered_elsewhere": False, **extra}


def in_call(call: Call, user: str, message: dict[str, Any], *, grant: bool = False) -> Notice:
    """``message`` for ``user``'s device in the call (all of theirs when it is not known)."""
    device = call.device_of(user)
    return Notice(user, message, devices=frozenset({device}) if device else None, grant=grant)


def participant_message(call: Call, user: str) -> dict[str, Any]:
    return {
        "type": "call.participant",
        "call_id": call.call_id,
        "user": user,
        "state": call.participant(user).state.value,
    }


def participant_notices(call: Call, changed: Iterable[str]) -> list[Notice]:
    """``call.participant`` about each changed user, for every joined participant's
    in-call device (group calls)."""
    if call.group is None:
        return []
    joined = call.joined()
    return [
        in_call(call, to, participant_message(call, user))
        for user in changed
        for to in joined
        if to != user
    ]


def _fanout(call: Call, now: datetime, *, callee_too: bool) -> list[Notice]:
    """1:1: ``call.state`` to the caller's devices and (if it rang for them) the callee's
    (their answering device once answered)."""
    message = state_message(call, now)
    notices = [Notice(call.caller, message)]
    if callee_too:
        notices.append(in_call(call, call.peer, message))
    return notices


def _group_fanout(call: Call, now: datetime, ringing: Iterable[str] = ()) -> list[Notice]:
    """A group call's ``call.state``: every joined participant's in-call device, and every
    device of ``ringing`` (whose ring it stops)."""
    message = state_message(call, now)
    notices = [in_call(call, user, message) for user in call.joined()]
    notices += [Notice(user, message) for user in ringing]
    return notices


# ---------------------------------------------------------------------------- events


def _ids(call: Call, callee: str | None) -> dict[str, Any]:
    """An event's call fields; ``callee``: the 1:1 callee, or the group invitee it is about."""
    return {"call_id": call.call_id, "caller": call.caller, "callee": callee, "group": call.group}


def ended_event(call: Call, now: datetime) -> CallEnded:
    assert call.end_reason is not None
    return CallEnded(
        **_ids(call, call.callee),
        reason=call.end_reason,
        duration_s=call.duration_s(now),
        media=call.media,
    )


# ---------------------------------------------------------------------------- rules


def is_busy(user: str, calls: Iterable[Call], *, except_call: str) -> bool:
    """``user`` is joined in another call that is answered and not over (no call-waiting)."""
    return any(
        c.call_id != except_call
        and c.state in IN_CALL_STATES
        and c.participant(user).state is P.JOINED
        for c in calls
    )


def reverse_call(call: Call, callee_live: Iterable[Call]) -> Call | None:
    """The callee's 1:1 call to this caller that rings now (glare), if any."""
    for other in callee_live:
        if (
            other.group is None
            and other.caller == call.callee
            and other.callee == call.caller
            and other.state is S.RINGING
        ):
            return other
    return None


def _with(call: Call, changes: Mapping[str, Participant]) -> Call:
    return replace(call, participants={**call.participants, **changes})


def _answered_1to1(
    call: Call, action: CallAction, now: datetime, device: str | None, node: MediaNode
) -> Call:
    """The 1:1 call answered (accept, glare) by the callee on ``device`` (None: not known),
    its media on ``node``."""
    after = call.step(
        action,
        at=now,
        answered_device=device,
        media_node=node.node_id,
        media_url=node.session_url(call.call_id),
    )
    return _with(after, {call.peer: call.participant(call.peer).joined(now, device)})


def _settle(call: Call, now: datetime, *, ringing_to: ParticipantState) -> dict[str, Participant]:
    """At the call's end: the joined leave, those it rings for end ``ringing_to``."""
    changes: dict[str, Participant] = {}
    for user, part in call.participants.items():
        if part.state is P.JOINED:
            changes[user] = part.left(now)
        elif part.state is P.RINGING:
            changes[user] = replace(part, state=ringing_to, left_at=None)
    return changes


def _end_1to1(call: Call, action: CallAction, now: datetime, **changes: Any) -> Call:
    """A 1:1 call's call-level step into a final state, participants settled."""
    after = call.step(action, at=now, **changes)
    ringing_to = P.DECLINED if action is A.DECLINE else P.MISSED
    settled = _settle(after, now, ringing_to=ringing_to)
    if action is A.CALLEE_BUSY:
        settled[call.peer] = replace(call.participant(call.peer), state=P.NOT_RUNG)
    return _with(after, settled)


# ---------------------------------------------------------------------------- placing


def _placed(event: CallRequested, device: str | None, now: datetime, **call: Any) -> Step[Call]:
    """The call ``event`` asks policy about, new in REQUESTED, written with the event."""
    placed = Call(
        call_id=event.call_id,
        caller=event.caller,
        callee=event.callee,
        group=event.group,
        media=event.media,
        state=S.REQUESTED,
        created_at=now,
        caller_device=device,
        **call,
    )
    return Step(placed, writes=[Write(None, placed)], events=[event])


def new_one_to_one(
    call_id: str, caller: str, callee: str, media: MediaKind, device: str | None, now: datetime
) -> Step[Call]:
    event = CallRequested(call_id=call_id, caller=caller, callee=callee, media=media)
    return _placed(event, device, now)


def new_group_call(
    call_id: str,
    starter: str,
    group: str,
    media: MediaKind,
    device: str | None,
    now: datetime,
    *,
    members: Sequence[str],
) -> Step[Call]:
    """The starter (a member: else NotFound) joined from the start; every other member
    an invitee, for policy to say whom to ring."""
    if starter not in members:
        raise NotFound(group)
    invitees = sorted(set(members) - {starter})
    parts = {
        starter: Participant(P.JOINED, Role.CALLER, joined_at=now, device=device, since=now),
        **{user: Participant(P.INVITED, Role.CALLEE) for user in invitees},
    }
    event = CallRequested(
        call_id=call_id, caller=starter, group=group, media=media, invitees=invitees
    )
    return _placed(event, device, now, participants=parts)


# ---------------------------------------------------------------------------- policy


def decide_authorized(
    call: Call,
    now: datetime,
    *,
    live: Mapping[str, Sequence[Call]],
    node: MediaNode | None,
    ring_timeout_s: float,
    ring: Sequence[str] = (),
) -> Step[None]:
    """Policy allowed the call: it rings (1:1: unless the callee is busy, or glare).
    ``live``: the live calls of the callee and the caller (1:1), of each ``ring`` invitee
    (group); ``node``: a media node, read when a glare may need one."""
    call_rule(call.state, A.AUTHORIZE, frozenset({Actor.POLICY}), call.call_id)
    deadline = now + timedelta(seconds=ring_timeout_s)
    if call.group is not None:
        return _authorized_group(call, now, live=live, ring=ring, deadline=deadline)
    callee_live = [c for c in live.get(call.peer, ()) if c.call_id != call.call_id]
    caller_live = [c for c in live.get(call.caller, ()) if c.call_id != call.call_id]
    step: Step[None] = Step(None, checks=list(callee_live))
    if is_busy(call.peer, callee_live, except_call=call.call_id):
        busy = _end_1to1(call, A.CALLEE_BUSY, now)
        step.writes.append(Write(call, busy))
        step.events.append(ended_event(busy, now))
        step.notices = _fanout(busy, now, callee_too=False)
        return step
    # The reverse call is looked for among the callee's live calls: it is there from its
    # creation (the callee placed it), and those calls' versions are checked at commit,
    # so a reverse call that starts ringing after this read makes the commit retry and
    # the retry finds it ringing. (The caller's set holds it only once it rings.)
    reverse = reverse_call(call, callee_live)
    if reverse is not None and node is not None:
        return decide_glare(step, call, reverse, node, now, caller_live)
    ringing = call.step(A.AUTHORIZE, at=now, ring_deadline=deadline)
    ringing = _with(
        ringing, {call.peer: replace(call.participant(call.peer), state=P.RINGING, rung=True)}
    )
    step.writes.append(Write(call, ringing))
    step.events.append(
        CallRinging(**_ids(call, call.peer), media=call.media, ring_deadline=deadline)
    )
    step.notices = [
        Notice(call.caller, state_message(ringing, now)),
        Notice(call.peer, {"type": "call.incoming", **ringing.public(now)}),
    ]
    return step


def _authorized_group(
    call: Call,
    now: datetime,
    *,
    live: Mapping[str, Sequence[Call]],
    ring: Sequence[str],
    deadline: datetime,
) -> Step[None]:
    """Each invitee policy rings is rung on every device unless busy (then ``not_rung``:
    no call-waiting); the others are ``not_rung``. The call rings (even for nobody: its
    members may join until the deadline)."""
    rung = set(ring)
    changes: dict[str, Participant] = {}
    ringing: list[str] = []
    for user, part in sorted(call.participants.items()):
        if part.state is not P.INVITED:
            continue
        if user in rung and not is_busy(user, live.get(user, ()), except_call=call.call_id):
            changes[user] = replace(part, state=P.RINGING, rung=True)
            ringing.append(user)
        else:
            changes[user] = replace(part, state=P.NOT_RUNG)
    after = _with(call.step(A.AUTHORIZE, at=now, ring_deadline=deadline), changes)
    read = {c.call_id: c for calls in live.values() for c in calls if c.call_id != call.call_id}
    step: Step[None] = Step(None, writes=[Write(call, after)], checks=list(read.values()))
    step.events = [
        CallRinging(**_ids(call, user), media=call.media, ring_deadline=deadline)
        for user in ringing
    ]
    step.notices = [Notice(call.caller, state_message(after, now))]
    step.notices += [
        Notice(user, {"type": "call.incoming", **after.public(now)}) for user in ringing
    ]
    return step


def decide_glare(
    step: Step[None],
    call: Call,
    other: Call,
    node: MediaNode,
    now: datetime,
    caller_live: Sequence[Call],
) -> Step[None]:
    """``call`` was just authorized while ``other`` (the reverse direction) rings: the
    lesser id survives, answered by the device the other call was placed from (its
    caller's ``device_id``; when it named none, no device is known: the answer goes to
    every device of theirs, and ``call_accepted``'s ``device_id`` is ``""``)."""
    step.checks.extend(caller_live)
    if glare_winner(call.call_id, other.call_id) == other.call_id:
        winner, loser = other, call
    else:
        winner, loser = call, other
    device = loser.caller_device
    won = _answered_1to1(winner, A.GLARE_WIN, now, device, node)
    lost = _end_1to1(loser, A.GLARE_LOSE, now, replaced_by=winner.call_id)
    step.writes += [Write(loser, lost), Write(winner, won)]
    step.events.append(CallCancelled(**_ids(lost, lost.peer)))
    step.events.append(CallAccepted(**_ids(won, won.peer), device_id=device))
    step.notices = _fanout(lost, now, callee_too=loser.state is S.RINGING)
    step.notices += _accepted_1to1(won, now)
    return step


def decide_rejected(call: Call, now: datetime, reason: RejectReason) -> Step[Call]:
    call_rule(call.state, A.REJECT, frozenset({Actor.POLICY}), call.call_id)
    after = call.step(A.REJECT, at=now, reject_reason=reason)
    after = _with(after, _settle(after, now, ringing_to=P.MISSED))
    step: Step[Call] = Step(after, writes=[Write(call, after)])
    step.notices = [Notice(call.caller, state_message(after, now))]
    return step


# ---------------------------------------------------------------------------- answering


def _accepted_1to1(call: Call, now: datetime) -> list[Notice]:
    """Accepted: each party its own media; the callee's other devices: answered elsewhere."""
    base = state_message(call, now)
    notices = [Notice(call.caller, base, grant=True)]
    device = call.answered_device
    if device:
        notices.append(Notice(call.peer, base, devices=frozenset({device}), grant=True))
        elsewhere = {
            **base,
            "answered_elsewhere": True,
            "end_reason": EndReason.ANSWERED_ELSEWHERE.value,
        }
        notices.append(Notice(call.peer, elsewhere, except_devices=frozenset({device})))
    else:
        notices.append(Notice(call.peer, base, grant=True))
    return notices


def decide_accept(
    call: Call,
    user: str,
    device: str,
    now: datetime,
    *,
    node: MediaNode | None,
    member: bool = False,
    max_participants: int = 0,
) -> Step[Granted | Again]:
    """Answer on one device: the callee of a 1:1 call, a rung invitee of a group call.
    ``node``: a live media node, read when the call may need one (it is not answered yet)."""
    if not call.visible_to(user):
        raise NotFound(call.call_id)
    if call.group is not None:
        part = call.participant(user)
        if part.state is P.JOINED and call.state in IN_CALL_STATES and part.device == device:
            return Step(Again())
        if part.state is not P.RINGING:
            raise IllegalTransition(call.state, PA.ACCEPT, call.call_id, participant=part.state)
        return decide_join(
            call, user, device, now, node=node, member=member, max_participants=max_participants
        )
    if user == call.callee and call.state in IN_CALL_STATES and call.answered_device == device:
        return Step(Again())
    call_rule(call.state, A.ACCEPT, call.actors(user), call.call_id)
    if node is None:
        raise NoMediaNode()
    after = _answered_1to1(call, A.ACCEPT, now, device, node)
    step: Step[Granted | Again] = Step(Granted(user), writes=[Write(call, after)])
    step.events.append(CallAccepted(**_ids(call, user), device_id=device))
    step.notices = _accepted_1to1(after, now)
    return step


def decide_join(
    call: Call,
    user: str,
    device: str | None,
    now: datetime,
    *,
    node: MediaNode | None,
    member: bool,
    max_participants: int,
) -> Step[Granted | Again]:
    """A current member into a group call (a rung invitee: their accept, which stops their
    other devices). The first besides the starter answers the call (``accepted``: the
    media node is picked, the starter's in-call device gets its grant)."""
    if call.group is None:
        if not call.visible_to(user):
            raise NotFound(call.call_id)
        raise IllegalTransition(call.state, PA.JOIN, call.call_id)
    if not member:
        raise NotFound(call.call_id)  # only current members; never a membership oracle
    if call.state not in SIGNAL_STATES:
        raise IllegalTransition(
            call.state, PA.JOIN, call.call_id, participant=call.participant(user).state
        )
    part = call.participant(user)
    action = PA.ACCEPT if part.state is P.RINGING else PA.JOIN
    actors = call.actors(user, member=True)
    participant_rule(call, user, action, actors)
    if max_participants and len(call.joined()) >= max_participants:
        raise CallFull(call.call_id, max_participants)
    after = call
    answering = call.state is S.RINGING
    if answering:
        call_rule(call.state, A.ACCEPT, actors, call.call_id)
        if node is None:
            raise NoMediaNode()
        after = call.step(
            A.ACCEPT, at=now, media_node=node.node_id, media_url=node.session_url(call.call_id)
        )
    after = _with(after, {user: part.joined(now, device)})
    step: Step[Granted | Again] = Step(Granted(user), writes=[Write(call, after)])
    if action is PA.ACCEPT:
        step.events.append(CallAccepted(**_ids(call, user), device_id=device))
    step.events.append(CallParticipantJoined(call_id=call.call_id, user=user, group=call.group))
    own = state_message(after, now)
    if device:
        step.notices.append(Notice(user, own, devices=frozenset({device}), grant=True))
        if action is PA.ACCEPT:
            elsewhere = {
                **own,
                "answered_elsewhere": True,
                "end_reason": EndReason.ANSWERED_ELSEWHERE.value,
            }
            step.notices.append(Notice(user, elsewhere, except_devices=frozenset({device})))
    else:
        step.notices.append(Notice(user, own, grant=True))
    if answering and after.participant(call.caller).state is P.JOINED:
        step.notices.append(in_call(after, call.caller, own, grant=True))
    step.notices += participant_notices(after, [user])
    return step


def decide_decline(call: Call, user: str, now: datetime) -> Step[Call]:
    if not call.visible_to(user):
        raise NotFound(call.call_id)
    if call.group is None:
        call_rule(call.state, A.DECLINE, call.actors(user), call.call_id)
        return _end_before_answer(call, A.DECLINE, now)
    participant_rule(call, user, PA.DECLINE, call.actors(user))
    after = _with(call, {user: replace(call.participant(user), state=P.DECLINED)})
    step: Step[Call] = Step(after, writes=[Write(call, after)])
    step.events.append(CallDeclined(**_ids(call, user)))
    step.notices = [Notice(user, state_message(after, now))]
    step.notices += participant_notices(after, [user])
    return step


def _end_before_answer(call: Call, action: CallAction, now: datetime) -> Step[Call]:
    """A 1:1 call ends before an answer: declined, cancelled, or missed."""
    rang = call.state is S.RINGING
    after = _end_1to1(call, action, now)
    step: Step[Call] = Step(after, writes=[Write(call, after)])
    ids = _ids(call, call.peer)
    if action is A.DECLINE:
        step.events.append(CallDeclined(**ids))
    elif action is A.CANCEL:
        step.events.append(CallCancelled(**ids))
    elif action is A.RING_TIMEOUT:
        step.events.append(CallMissed(**ids, media=call.media))
    step.notices = _fanout(after, now, callee_too=rang)
    return step


# ---------------------------------------------------------------------------- leaving


def decide_hangup(call: Call, user: str, now: datetime) -> Step[Call]:
    """Hang up: 1:1 — the caller's before an answer is a cancel, the callee's a decline,
    after it either ends the call. Group — a rung invitee's is a decline; a joined
    participant leaves, and the call ends with its last one (the starter leaving while
    nobody answered cancels it)."""
    if not call.visible_to(user):
        raise NotFound(call.call_id)
    actors = call.actors(user)
    if call.group is None:
        if call.state in (S.REQUESTED, S.RINGING):
            action = A.CANCEL if Actor.CALLER in actors else A.DECLINE
            call_rule(call.state, action, actors, call.call_id)
            return _end_before_answer(call, action, now)
        call_rule(call.state, A.HANGUP, actors, call.call_id)
        after = _end_1to1(call, A.HANGUP, now)
        step: Step[Call] = Step(after, writes=[Write(call, after)])
        step.events.append(ended_event(after, now))
        step.notices = _fanout(after, now, callee_too=True)
        return step
    part = call.participant(user)
    if part.state is P.RINGING:
        return decide_decline(call, user, now)
    participant_rule(call, user, PA.LEAVE, actors)
    if call.state in (S.REQUESTED, S.RINGING):
        return _cancel_group(call, now, actors)
    return _leave_group(call, user, now)


def _cancel_group(call: Call, now: datetime, actors: frozenset[Actor]) -> Step[Call]:
    """The starter left before anyone answered: the call is cancelled, its ring stops."""
    call_rule(call.state, A.CANCEL, actors, call.call_id)
    ringing = call.ringing()
    after = call.step(A.CANCEL, at=now)
    after = _with(after, _settle(after, now, ringing_to=P.MISSED))
    step: Step[Call] = Step(after, writes=[Write(call, after)])
    step.events = [CallCancelled(**_ids(call, user)) for user in ringing]
    message = state_message(after, now)
    step.notices = [Notice(call.caller, message)] + [Notice(u, message) for u in ringing]
    return step


def _leave_group(call: Call, user: str, now: datetime) -> Step[Call]:
    left = _with(call, {user: call.participant(user).left(now)})
    step: Step[Call] = Step(left)
    step.events.append(CallParticipantLeft(call_id=call.call_id, user=user, group=call.group))
    step.notices = [Notice(user, state_message(left, now))]
    if left.joined():
        step.writes.append(Write(call, left))
        step.notices += participant_notices(left, [user])
        return step
    ringing = left.ringing()
    after = left.step(A.HANGUP, at=now)
    after = _with(after, _settle(after, now, ringing_to=P.MISSED))
    step.result = after
    step.writes.append(Write(call, after))
    step.events += [CallMissed(**_ids(call, u), media=call.media) for u in ringing]
    step.events.append(ended_event(after, now))
    step.notices = [Notice(user, state_message(after, now))]
    step.notices += [Notice(u, state_message(after, now)) for u in ringing]
    return step


# ---------------------------------------------------------------------------- deadlines


def decide_ring_timeout(call: Call, now: datetime) -> Step[Outcome]:
    """The ring deadline: 1:1 — a ringing call is missed. Group — every invitee it still
    rings for is missed (one ``call_missed`` each, in this one commit); nobody answered:
    the call ends ``missed``."""
    if call.group is None:
        if call.state is not S.RINGING:
            return Step(Outcome.NOTHING)
        if call.ring_deadline is None or call.ring_deadline > now:
            return Step(Outcome.NOT_DUE)
        call_rule(call.state, A.RING_TIMEOUT, frozenset({Actor.TIMER}), call.call_id)
        done = _end_before_answer(call, A.RING_TIMEOUT, now)
        return Step(Outcome.FIRED, done.writes, done.checks, done.events, done.notices)
    ringing = call.ringing()
    if call.state not in LIVE_STATES or call.ring_deadline is None:
        return Step(Outcome.NOTHING)
    if not ringing and call.state is not S.RINGING:
        return Step(Outcome.NOTHING)
    if call.ring_deadline > now:
        return Step(Outcome.NOT_DUE)
    timer = frozenset({Actor.TIMER})
    for user in ringing:
        participant_rule(call, user, PA.MISS, timer)
    after = _with(call, {u: replace(call.participant(u), state=P.MISSED) for u in ringing})
    events: list[Event] = [CallMissed(**_ids(call, u), media=call.media) for u in ringing]
    if call.state is S.RINGING:  # nobody besides the starter answered
        call_rule(call.state, A.RING_TIMEOUT, timer, call.call_id)
        after = after.step(A.RING_TIMEOUT, at=now)
        after = _with(after, _settle(after, now, ringing_to=P.MISSED))
        events.append(ended_event(after, now))
        notices = [Notice(call.caller, state_message(after, now))]
    else:
        notices = participant_notices(after, ringing)
    notices += [Notice(u, state_message(after, now)) for u in ringing]
    return Step(Outcome.FIRED, writes=[Write(call, after)], events=events, notices=notices)


def decide_rejoin_timeout(call: Call, now: datetime) -> Step[Outcome]:
    """A moved call whose media did not flow on its new node in time ends ``media_timeout``."""
    if call.state not in IN_CALL_STATES or call.rejoin_deadline is None:
        return Step(Outcome.NOTHING)
    if call.rejoin_deadline > now:
        return Step(Outcome.NOT_DUE)
    done = _media_end(call, now, EndReason.MEDIA_TIMEOUT, Actor.TIMER)
    return Step(Outcome.FIRED, done.writes, done.checks, done.events, done.notices)


# ---------------------------------------------------------------------------- media


def _from_the_calls_node(call: Call, action: CallAction, node_id: str) -> None:
    """A media event counts only from the node that hosts the call's room."""
    if call.media_node and call.media_node != node_id:
        raise IllegalTransition(call.state, action, call.call_id)


def _in_call_fanout(call: Call, now: datetime, ringing: Iterable[str] = ()) -> list[Notice]:
    if call.group is None:
        return _fanout(call, now, callee_too=True)
    return _group_fanout(call, now, ringing)


def decide_media_connected(call: Call, node_id: str, now: datetime) -> Step[None]:
    action = media_connected_action(call)
    _from_the_calls_node(call, action, node_id)
    call_rule(call.state, action, frozenset({Actor.MEDIA}), call.call_id)
    after = call.step(action, at=now)
    step: Step[None] = Step(None, writes=[Write(call, after)])
    if action is not A.MEDIA_RESUMED:
        step.notices = _in_call_fanout(after, now)
    if call.rejoin_deadline is not None:
        # Media flows on the new node for everyone: whatever the old node last said (a
        # party reconnecting), each participant's peers are connected now.
        parties = after.joined() if after.group is not None else [after.caller, after.peer]
        for user in parties:
            message = {
                "type": "call.peer",
                "call_id": after.call_id,
                "user": user,
                "connection": PeerConnection.CONNECTED.value,
            }
            step.notices += [in_call(after, to, message) for to in after.others_joined(user)]
    return step


def _media_end(call: Call, now: datetime, reason: EndReason, actor: Actor) -> Step[None]:
    call_rule(call.state, A.MEDIA_FAILED, frozenset({actor}), call.call_id)
    ringing = call.ringing() if call.group is not None else []
    after = call.step(A.MEDIA_FAILED, at=now, media_failure=reason)
    joined_before = call.joined() if call.group is not None else []
    after = _with(after, _settle(after, now, ringing_to=P.MISSED))
    step: Step[None] = Step(None, writes=[Write(call, after)])
    step.events = [CallMissed(**_ids(call, u), media=call.media) for u in ringing]
    step.events.append(ended_event(after, now))
    if call.group is None:
        step.notices = _fanout(after, now, callee_too=True)
    else:
        message = state_message(after, now)
        step.notices = [in_call(call, u, message) for u in joined_before]
        step.notices += [Notice(u, message) for u in ringing]
    return step


def decide_media_failed(call: Call, node_id: str, reason: EndReason, now: datetime) -> Step[None]:
    _from_the_calls_node(call, A.MEDIA_FAILED, node_id)
    return _media_end(call, now, reason, Actor.MEDIA)


def media_peer_notices(
    call: Call, node_id: str, user: str, connection: PeerConnection
) -> list[Notice]:
    """``call.peer`` about one participant's media, for every other joined participant;
    nothing for another node's report or a user not joined."""
    if (
        call.state not in IN_CALL_STATES
        or call.media_node != node_id
        or call.role_of(user) is None
        or (call.group is not None and call.participant(user).state is not P.JOINED)
    ):
        return []
    message = {
        "type": "call.peer",
        "call_id": call.call_id,
        "user": user,
        "connection": connection.value,
    }
    return [in_call(call, to, message) for to in call.others_joined(user)]


def decide_move(
    call: Call,
    leaving: str,
    node: MediaNode | None,
    reason: MediaMoveReason,
    now: datetime,
    *,
    grace_s: float,
) -> Step[Moved]:
    """Move the call's media off ``leaving`` to ``node`` (every joined participant's
    in-call device gets ``call.media`` with a fresh grant). Nothing when the call is not
    on ``leaving`` (moved already) or not in progress; with no node, a lost node's call
    starts its rejoin deadline all the same (once)."""
    if call.media_node != leaving or call.state not in IN_CALL_STATES:
        return Step(Moved(None))
    # From the move (or the loss): a lost node's parties stopped about a registry TTL
    # before it, so a call nobody rejoins ends within TTL + grace of the crash.
    deadline = now + timedelta(seconds=grace_s)
    if node is None:
        step: Step[Moved] = Step(Moved(None, stranded=True))
        if reason is not MediaMoveReason.NODE_LOST:
            return step  # a draining node forwards on; it is lost once it exits
        waiting = media_lost(call, node_id=leaving, at=now, rejoin_deadline=deadline)
        if waiting is not None:
            call_rule(call.state, A.MEDIA_LOST, frozenset({Actor.SYSTEM}), call.call_id)
            step.writes.append(Write(call, waiting))
        return step
    after = move_media(
        call,
        leaving=leaving,
        node_id=node.node_id,
        media_url=node.session_url(call.call_id),
        at=now,
        rejoin_deadline=deadline,
    )
    if after is None:
        return Step(Moved(None))
    step = Step(Moved(after), writes=[Write(call, after)])
    parties = after.joined() if after.group is not None else [after.caller, after.peer]
    for user in parties:
        message = {"type": "call.media", "call_id": after.call_id, "reason": reason.value}
        step.notices.append(in_call(after, user, message, grant=True))
    return step


def decide_upgrade(call: Call, user: str, now: datetime) -> Step[Call]:
    if not call.visible_to(user):
        raise NotFound(call.call_id)
    upgraded = upgrade_to_video(call, at=now)
    if upgraded is None:
        return Step(call)
    call_rule(call.state, A.UPGRADE_VIDEO, call.actors(user, member=True), call.call_id)
    return Step(upgraded, writes=[Write(call, upgraded)])


# ---------------------------------------------------------------------------- reading


def history_item(call: Call, user: str, now: datetime) -> dict[str, Any] | None:
    """``user``'s entry for the call, or None (not theirs to see)."""
    if not call.visible_to(user):
        return None
    if call.group is None:
        incoming = call.callee == user and call.caller != user
        return {
            **call.public(now),
            "direction": "incoming" if incoming else "outgoing",
            "missed": incoming and call.state in (S.MISSED, S.BUSY),
        }
    part = call.participant(user)
    incoming = user != call.caller
    return {
        **call.public(now),
        "direction": "incoming" if incoming else "outgoing",
        "missed": incoming and part.rung and part.joined_at is None,
        "duration_s": part.presence_s(call.ended_at or now),
    }


def ring_item(call: Call, user: str, now: datetime) -> dict[str, Any] | None:
    """The call in ``user``'s ring state: ringing for them, or their outgoing one."""
    if call.group is None:
        if call.callee == user and call.state is S.RINGING:
            return {**call.public(now), "direction": "incoming"}
    elif call.state in LIVE_STATES and call.participant(user).state is P.RINGING:
        return {**call.public(now), "direction": "incoming"}
    if call.caller == user and call.state in (S.REQUESTED, S.RINGING):
        return {**call.public(now), "direction": "outgoing"}
    return None


def signal_route(call: Call, user: str, to: str | None, *, ring_devices: int) -> Notice:
    """Where ``user``'s ``call.signal`` goes (the message is filled in by the caller):
    1:1 — the other party (``to``, if given, must be them); group — ``to`` is required,
    and relayed only between joined participants, to that participant's in-call device."""
    if call.state not in SIGNAL_STATES:
        raise IllegalTransition(call.state, "signal", call.call_id)
    if call.group is not None:
        if to is None:
            raise BadSignal("call.signal in a group call needs to: <user>")
        me, them = call.participant(user), call.participants.get(to)
        if them is None or them.state is not P.JOINED or me.state is not P.JOINED:
            state = me.state if me.state is not P.JOINED else None
            raise IllegalTransition(call.state, "signal", call.call_id, participant=state)
        return in_call(call, to, {})
    other = call.other(user)
    if to is not None and to != other:
        raise BadSignal(f"to: {to} is not in this call")
    if other == call.callee and call.state in IN_CALL_STATES:
        if call.answered_device:
            return Notice(other, {}, devices=frozenset({call.answered_device}))
        return Notice(other, {})
    if other == call.callee:
        # Ringing: not every device of the callee for every frame of the caller.
        return Notice(other, {}, newest=ring_devices)
    if call.caller_device:
        return Notice(other, {}, devices=frozenset({call.caller_device}))
    return Notice(other, {})


def media_state_targets(call: Call, user: str) -> list[str]:
    """Who hears ``user``'s ``call.media_state`` (``call.peer``): every other joined one."""
    if call.state not in IN_CALL_STATES:
        raise IllegalTransition(call.state, A.UPGRADE_VIDEO, call.call_id)
    if call.group is not None and call.participant(user).state is not P.JOINED:
        raise IllegalTransition(
            call.state, A.UPGRADE_VIDEO, call.call_id, participant=call.participant(user).state
        )
    return call.others_joined(user)


__all__ = [
    "FINAL_STATES",
    "Again",
    "BadSignal",
    "CallFull",
    "Granted",
    "Moved",
    "NoMediaNode",
    "NotFound",
    "Notice",
    "Outcome",
    "Step",
    "Write",
]
