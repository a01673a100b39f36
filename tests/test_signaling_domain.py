"""The call state machine, without I/O: every state x every action, allowed or refused."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from services.signaling import decisions as dec
from services.signaling.domain import (
    CALL_RULES,
    END_REASONS,
    PARTICIPANT_RULES,
    TRANSITIONS,
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
    next_state,
    participant_rule,
    upgrade_to_video,
)
from shared.contracts import (
    FINAL_STATES,
    CallState,
    EndReason,
    EventType,
    MediaKind,
    MediaMoveReason,
)
from shared.ids import new_call_id
from tests.support.signaling import NODE

S, A = CallState, CallAction

# Written out independently of the module: what the product allows (docs/signaling.md).
EXPECTED: dict[tuple[CallState, CallAction], CallState] = {
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

T0 = datetime(2026, 11, 21, 8, 0, tzinfo=UTC)


def make_call(state: CallState) -> Call:
    return Call(
        call_id=new_call_id(),
        caller="alice",
        callee="bob",
        media=MediaKind.AUDIO,
        state=state,
        created_at=T0,
    )


@pytest.mark.parametrize(
    ("state", "action"), list(itertools.product(CallState, CallAction)), ids=str
)
def test_every_state_and_action(state: CallState, action: CallAction) -> None:
    expected = EXPECTED.get((state, action))
    if expected is None:
        with pytest.raises(IllegalTransition) as refused:
            next_state(state, action)
        assert refused.value.state is state
        assert state.value in str(refused.value)
        return
    assert next_state(state, action) is expected


def test_the_table_is_exactly_the_expected_one() -> None:
    assert TRANSITIONS == EXPECTED


def test_no_step_leaves_a_final_state() -> None:
    for state in FINAL_STATES:
        assert not any(s is state for (s, _a) in TRANSITIONS)


@pytest.mark.parametrize(("state", "action"), list(EXPECTED), ids=str)
def test_a_step_into_a_final_state_records_when_and_why(
    state: CallState, action: CallAction
) -> None:
    call = make_call(state)
    if state in (S.ACCEPTED, S.ACTIVE):
        call = Call(**{**_fields(call), "answered_at": T0})
    at = T0 + timedelta(seconds=30)
    failure = EndReason.ICE_FAILED if action is A.MEDIA_FAILED else None
    after = call.step(action, at=at, media_failure=failure)
    assert after.state is EXPECTED[(state, action)]
    if after.state.is_final:
        assert after.ended_at == at
        assert after.end_reason is (failure or END_REASONS[action])
    else:
        assert after.ended_at is None and after.end_reason is None
    if after.state is S.ACCEPTED:
        # answered by this step; one answered already (a move, an upgrade) keeps its time
        assert after.answered_at == (T0 if state is S.ACCEPTED else at)


def test_an_illegal_step_on_a_call_names_the_call_and_its_state() -> None:
    call = make_call(S.MISSED)
    with pytest.raises(IllegalTransition, match=rf"cannot accept: call {call.call_id} is missed"):
        call.step(A.ACCEPT, at=T0)


def test_duration_counts_from_the_answer_to_the_end() -> None:
    call = Call(**{**_fields(make_call(S.ACTIVE)), "answered_at": T0})
    ended = call.step(A.HANGUP, at=T0 + timedelta(seconds=42.5))
    assert ended.duration_s() == 42.5
    assert make_call(S.RINGING).duration_s() == 0.0


def test_glare_keeps_the_lesser_id() -> None:
    older = new_call_id()
    newer = new_call_id()
    while newer == older:
        newer = new_call_id()
    assert glare_winner(newer, older) == glare_winner(older, newer) == min(older, newer)


def test_the_callee_sees_a_call_only_once_it_reached_them() -> None:
    requested = make_call(S.REQUESTED)
    rejected = requested.step(A.REJECT, at=T0)
    cancelled_early = requested.step(A.CANCEL, at=T0)
    ringing = requested.step(A.AUTHORIZE, at=T0, ring_deadline=T0 + timedelta(seconds=60))
    busy = requested.step(A.CALLEE_BUSY, at=T0)
    for call in (requested, rejected, cancelled_early):
        assert call.visible_to("alice") and not call.visible_to("bob"), call.state
    for call in (ringing, ringing.step(A.CANCEL, at=T0), busy):
        assert call.visible_to("alice") and call.visible_to("bob"), call.state
    assert not any(c.visible_to("mallory") for c in (requested, ringing, busy))


def _fields(call: Call) -> dict[str, object]:
    return {name: getattr(call, name) for name in Call.__slots__}


def _on_node(state: CallState, node: str = "node-1") -> Call:
    return Call(
        **{
            **_fields(make_call(state)),
            "answered_at": T0,
            "media_node": node,
            "media_url": f"http://{node}/v1/rooms/x/sessions",
        }
    )


def _to_node_2(call: Call, at: datetime = T0, deadline: datetime | None = None) -> Call | None:
    """``call`` moved off node-1 to node-2, its rejoin deadline ``deadline`` (else ``at``)."""
    return move_media(
        call,
        leaving="node-1",
        node_id="node-2",
        media_url="u2",
        at=at,
        rejoin_deadline=deadline or at,
    )


@pytest.mark.parametrize("state", [S.ACCEPTED, S.ACTIVE], ids=str)
def test_moving_media_keeps_the_call_and_starts_a_rejoin_deadline(state: CallState) -> None:
    call = _on_node(state)
    deadline = T0 + timedelta(seconds=33)
    moved = _to_node_2(call, deadline=deadline)
    assert moved is not None
    assert (moved.state, moved.media_node, moved.media_url) == (state, "node-2", "u2")
    assert (moved.call_id, moved.answered_at, moved.rejoin_deadline) == (
        call.call_id,
        T0,
        deadline,
    )
    assert moved.ended_at is None and moved.end_reason is None


def test_a_move_away_from_a_node_the_call_already_left_is_nothing() -> None:
    moved_before = _on_node(S.ACTIVE, node="node-2")
    moved_again = move_media(
        moved_before, leaving="node-1", node_id="node-3", media_url="u3", at=T0, rejoin_deadline=T0
    )
    assert moved_again is None


@pytest.mark.parametrize("state", [s for s in CallState if s not in (S.ACCEPTED, S.ACTIVE)])
def test_a_call_not_in_progress_is_never_moved(state: CallState) -> None:
    assert _to_node_2(_on_node(state)) is None


def test_media_on_the_new_node_ends_the_rejoin_deadline() -> None:
    moved = _to_node_2(_on_node(S.ACTIVE))
    assert moved is not None
    assert media_connected_action(moved) is A.MEDIA_RESUMED
    resumed = moved.step(A.MEDIA_RESUMED, at=T0)
    assert (resumed.state, resumed.rejoin_deadline) == (S.ACTIVE, None)
    # An active call with no move pending: a repeated connected event, refused.
    with pytest.raises(IllegalTransition):
        resumed.step(media_connected_action(resumed), at=T0)
    # Moved before its first media: connecting makes it active and ends the deadline too.
    accepted = _to_node_2(_on_node(S.ACCEPTED))
    assert accepted is not None and media_connected_action(accepted) is A.MEDIA_CONNECTED
    active = accepted.step(A.MEDIA_CONNECTED, at=T0)
    assert (active.state, active.rejoin_deadline) == (S.ACTIVE, None)


def test_a_moved_call_that_times_out_ends_media_timeout() -> None:
    moved = _to_node_2(_on_node(S.ACTIVE))
    assert moved is not None
    ended = moved.step(
        A.MEDIA_FAILED, at=T0 + timedelta(seconds=40), media_failure=EndReason.MEDIA_TIMEOUT
    )
    assert (ended.state, ended.end_reason, ended.rejoin_deadline) == (
        S.ENDED,
        EndReason.MEDIA_TIMEOUT,
        None,
    )


@pytest.mark.parametrize("state", [S.ACCEPTED, S.ACTIVE], ids=str)
def test_an_audio_call_upgrades_to_video_once(state: CallState) -> None:
    call = _on_node(state)
    upgraded = upgrade_to_video(call, at=T0)
    assert upgraded is not None
    assert (upgraded.state, upgraded.media) == (state, MediaKind.VIDEO)
    assert upgrade_to_video(upgraded, at=T0) is None


@pytest.mark.parametrize("state", [s for s in CallState if s not in (S.ACCEPTED, S.ACTIVE)])
def test_a_call_not_in_progress_is_never_upgraded(state: CallState) -> None:
    with pytest.raises(IllegalTransition):
        upgrade_to_video(_on_node(state), at=T0)
    video = Call(**{**_fields(_on_node(state)), "media": MediaKind.VIDEO})
    with pytest.raises(IllegalTransition):
        upgrade_to_video(video, at=T0)


@pytest.mark.parametrize("state", [S.ACCEPTED, S.ACTIVE], ids=str)
def test_a_move_or_an_upgrade_later_keeps_when_the_call_was_answered(state: CallState) -> None:
    # A step that lands in ACCEPTED again (a move or an upgrade before the first media)
    # is not a new answer: the duration and history count from the one answer.
    call = _on_node(state)
    later = T0 + timedelta(seconds=5)
    moved = _to_node_2(call, at=later)
    upgraded = upgrade_to_video(call, at=later)
    assert moved is not None and upgraded is not None
    assert (moved.answered_at, upgraded.answered_at) == (T0, T0)


@pytest.mark.parametrize("state", [S.ACCEPTED, S.ACTIVE], ids=str)
def test_a_lost_node_with_no_other_starts_the_deadline_once_and_keeps_the_call(
    state: CallState,
) -> None:
    call = _on_node(state)
    deadline = T0 + timedelta(seconds=30)
    waiting = media_lost(call, node_id="node-1", at=T0, rejoin_deadline=deadline)
    assert waiting is not None
    assert (waiting.state, waiting.media_node, waiting.rejoin_deadline) == (
        state,
        "node-1",
        deadline,
    )
    assert waiting.answered_at == call.answered_at
    # seen again on the next pass: the deadline runs from the first time, not again
    later = deadline + timedelta(seconds=5)
    assert media_lost(waiting, node_id="node-1", at=later, rejoin_deadline=later) is None
    # a node that appears in time takes the call: a move, with its own deadline
    moved = _to_node_2(waiting, at=later)
    assert moved is not None and moved.media_node == "node-2" and moved.rejoin_deadline == later


def test_media_lost_is_nothing_for_another_node_or_a_call_not_in_progress() -> None:
    assert media_lost(_on_node(S.ACTIVE), node_id="node-9", at=T0, rejoin_deadline=T0) is None
    for state in (S.RINGING, S.ENDED):
        assert media_lost(_on_node(state), node_id="node-1", at=T0, rejoin_deadline=T0) is None


# ---------------------------------------------------------------------------- the rule tables
# Who may take each call-level action, written out independently of the module.


Ac, P, PA = Actor, ParticipantState, ParticipantAction
PARTIES = {Ac.CALLER, Ac.CALLEE, Ac.MEMBER}
EXPECTED_BY: dict[CallAction, set[Actor]] = {
    A.AUTHORIZE: {Ac.POLICY},
    A.REJECT: {Ac.POLICY},
    A.CALLEE_BUSY: {Ac.SYSTEM},
    A.ACCEPT: {Ac.CALLEE, Ac.MEMBER},
    A.DECLINE: {Ac.CALLEE},
    A.CANCEL: {Ac.CALLER},
    A.RING_TIMEOUT: {Ac.TIMER},
    A.GLARE_WIN: {Ac.SYSTEM},
    A.GLARE_LOSE: {Ac.SYSTEM},
    A.MEDIA_CONNECTED: {Ac.MEDIA},
    A.MEDIA_FAILED: {Ac.MEDIA, Ac.TIMER},
    A.HANGUP: PARTIES,
    A.MOVE_MEDIA: {Ac.SYSTEM},
    A.MEDIA_LOST: {Ac.SYSTEM},
    A.MEDIA_RESUMED: {Ac.MEDIA},
    A.UPGRADE_VIDEO: PARTIES,
}

EXPECTED_PARTICIPANT: dict[
    tuple[ParticipantState, ParticipantAction], tuple[ParticipantState, set[Actor]]
] = {
    (P.INVITED, PA.RING): (P.RINGING, {Ac.POLICY}),
    (P.INVITED, PA.SKIP): (P.NOT_RUNG, {Ac.POLICY, Ac.SYSTEM}),
    (P.RINGING, PA.ACCEPT): (P.JOINED, {Ac.CALLEE}),
    (P.RINGING, PA.DECLINE): (P.DECLINED, {Ac.CALLEE}),
    (P.RINGING, PA.MISS): (P.MISSED, {Ac.TIMER, Ac.SYSTEM}),
    (P.RINGING, PA.CANCEL): (P.MISSED, {Ac.CALLER}),
    (P.NOT_RUNG, PA.JOIN): (P.JOINED, {Ac.CALLEE, Ac.MEMBER}),
    (P.DECLINED, PA.JOIN): (P.JOINED, {Ac.CALLEE, Ac.MEMBER}),
    (P.MISSED, PA.JOIN): (P.JOINED, {Ac.CALLEE, Ac.MEMBER}),
    (P.LEFT, PA.JOIN): (P.JOINED, {Ac.CALLER, Ac.CALLEE, Ac.MEMBER}),
    (P.JOINED, PA.LEAVE): (P.LEFT, PARTIES),
    (P.JOINED, PA.END): (P.LEFT, {Ac.SYSTEM, Ac.MEDIA, Ac.TIMER}),
}


@pytest.mark.parametrize(
    ("state", "action", "actor"), list(itertools.product(CallState, CallAction, Actor)), ids=str
)
def test_every_call_state_action_and_actor(
    state: CallState, action: CallAction, actor: Actor
) -> None:
    allowed = (state, action) in EXPECTED and actor in EXPECTED_BY[action]
    if allowed:
        assert call_rule(state, action, frozenset({actor})).to is EXPECTED[(state, action)]
    else:
        with pytest.raises(IllegalTransition) as refused:
            call_rule(state, action, frozenset({actor}), "c1")
        assert refused.value.state is state and state.value in str(refused.value)


def test_each_call_rule_names_its_events() -> None:
    emits = {key: rule.emits for key, rule in CALL_RULES.items()}
    assert emits[(S.REQUESTED, A.AUTHORIZE)] == (EventType.CALL_RINGING,)
    assert emits[(S.RINGING, A.RING_TIMEOUT)] == (EventType.CALL_MISSED,)
    assert CALL_RULES[(S.RINGING, A.RING_TIMEOUT)].group_emits == (EventType.CALL_ENDED,)
    assert emits[(S.ACTIVE, A.HANGUP)] == (EventType.CALL_ENDED,)
    assert emits[(S.REQUESTED, A.REJECT)] == ()  # policy's call_rejected is the event


def _group_call(state: CallState = S.RINGING, **parts: Participant) -> Call:
    return Call(
        call_id=new_call_id(),
        caller="alice",
        callee=None,
        group="g1",
        media=MediaKind.AUDIO,
        state=state,
        created_at=T0,
        ring_deadline=T0 + timedelta(seconds=30),
        participants={
            "alice": Participant(P.JOINED, Role.CALLER, joined_at=T0, since=T0, device="a1"),
            **parts,
        },
    )


@pytest.mark.parametrize(
    ("pstate", "action", "actor"),
    list(itertools.product(ParticipantState, ParticipantAction, Actor)),
    ids=str,
)
def test_every_participant_state_action_and_actor(
    pstate: ParticipantState, action: ParticipantAction, actor: Actor
) -> None:
    call = _group_call(bob=Participant(pstate, Role.CALLEE))
    expected = EXPECTED_PARTICIPANT.get((pstate, action))
    if expected is not None and actor in expected[1]:
        assert participant_rule(call, "bob", action, frozenset({actor})).to is expected[0]
    else:
        with pytest.raises(IllegalTransition) as refused:
            participant_rule(call, "bob", action, frozenset({actor}))
        assert refused.value.participant is pstate and refused.value.state is S.RINGING


def test_the_participant_table_is_exactly_the_expected_one() -> None:
    got = {k: (r.to, set(r.by)) for k, r in PARTICIPANT_RULES.items()}
    assert got == EXPECTED_PARTICIPANT


def test_nobody_joins_a_one_to_one_call() -> None:
    call = make_call(S.ACTIVE)
    with pytest.raises(IllegalTransition):
        participant_rule(call, "bob", PA.JOIN, frozenset({Ac.MEMBER, Ac.CALLEE}))


# ---------------------------------------------------------------------------- busy and glare


def _ringing_1to1(
    caller: str, callee: str, device: str | None, at: datetime = T0, call_id: str = ""
) -> Call:
    placed = dec.new_one_to_one(
        call_id or new_call_id(), caller, callee, MediaKind.AUDIO, device, at
    )
    step = dec.decide_authorized(placed.result, at, live={}, node=None, ring_timeout_s=30)
    return step.writes[0].after


def test_busy_is_joined_in_a_call_in_progress() -> None:
    active = make_call(S.ACTIVE)  # alice -> bob
    assert dec.is_busy("bob", [active], except_call="x")
    assert dec.is_busy("alice", [active], except_call="x")
    assert not dec.is_busy("bob", [active], except_call=active.call_id)
    assert not dec.is_busy("bob", [make_call(S.RINGING)], except_call="x")
    # ringing for bob in a group call in progress is not being in it
    group = _group_call(S.ACTIVE, bob=Participant(P.RINGING, Role.CALLEE, rung=True))
    assert not dec.is_busy("bob", [group], except_call="x")
    assert dec.is_busy("alice", [group], except_call="x")


def test_a_callee_in_a_call_makes_the_new_call_busy() -> None:
    new = Call(
        call_id=new_call_id(),
        caller="carol",
        callee="bob",
        media=MediaKind.AUDIO,
        state=S.REQUESTED,
        created_at=T0,
    )
    step = dec.decide_authorized(
        new, T0, live={"bob": [make_call(S.ACTIVE)], "carol": []}, node=None, ring_timeout_s=30
    )
    busy = step.writes[0].after
    assert (busy.state, busy.end_reason) == (S.BUSY, EndReason.BUSY)
    assert busy.participant("bob").state is P.NOT_RUNG
    assert [e.type for e in step.events] == [EventType.CALL_ENDED]
    assert [n.user for n in step.notices] == ["carol"]  # never rung for bob


@pytest.mark.parametrize("device", ["b1", None])
def test_glare_the_lesser_id_survives_answered_by_the_losers_device(device: str | None) -> None:
    x = _ringing_1to1("alice", "bob", "a1", call_id="0" * 31 + "1")  # alice -> bob rings
    y = Call(
        call_id="0" * 31 + "2",
        caller="bob",
        callee="alice",
        media=MediaKind.AUDIO,
        state=S.REQUESTED,
        created_at=T0,
        caller_device=device,
    )
    assert x.call_id < y.call_id
    step = dec.decide_authorized(
        y, T0, live={"alice": [x], "bob": [x]}, node=NODE, ring_timeout_s=30
    )
    after = {w.after.call_id: w.after for w in step.writes}
    won, lost = after[x.call_id], after[y.call_id]
    assert won.state is S.ACCEPTED and won.media_node == NODE.node_id
    assert won.answered_device == device  # None when unknown: never a made-up id
    assert (lost.state, lost.replaced_by) == (S.CANCELLED, x.call_id)
    accepted = [e for e in step.events if e.type is EventType.CALL_ACCEPTED]
    assert [e.device_id for e in accepted] == [device]  # type: ignore[attr-defined]
    to_bob = [n for n in step.notices if n.user == "bob" and n.grant]
    assert len(to_bob) == 1
    assert to_bob[0].devices == (frozenset({device}) if device else None)
    # no media node: no glare, both ring
    plain = dec.decide_authorized(
        y, T0, live={"alice": [x], "bob": [x]}, node=None, ring_timeout_s=30
    )
    assert plain.writes[0].after.state is S.RINGING


def test_a_group_call_rings_the_invitees_policy_rings_unless_busy() -> None:
    call = _group_call(
        S.REQUESTED,
        bob=Participant(P.INVITED, Role.CALLEE),
        carol=Participant(P.INVITED, Role.CALLEE),
        dave=Participant(P.INVITED, Role.CALLEE),
    )
    dave_busy = make_call(S.ACTIVE)
    dave_busy = replace(dave_busy, callee="dave", participants={})
    dave_busy = Call(**{**_fields(dave_busy), "participants": {}})
    step = dec.decide_authorized(
        call,
        T0,
        live={"bob": [], "dave": [dave_busy]},
        node=None,
        ring_timeout_s=30,
        ring=["bob", "dave"],
    )
    after = step.writes[0].after
    assert after.state is S.RINGING
    states = {u: p.state for u, p in after.participants.items()}
    assert states == {"alice": P.JOINED, "bob": P.RINGING, "carol": P.NOT_RUNG, "dave": P.NOT_RUNG}
    ringing = [e for e in step.events if e.type is EventType.CALL_RINGING]
    assert [(e.callee, e.group) for e in ringing] == [("bob", "g1")]  # type: ignore[attr-defined]
    incoming = [n for n in step.notices if n.message["type"] == "call.incoming"]
    assert [(n.user, n.devices) for n in incoming] == [("bob", None)]  # every device
    assert dave_busy in step.checks  # what made dave busy must not change before the commit


# ---------------------------------------------------------------------------- answering, leaving


def _rung(*users: str) -> dict[str, Participant]:
    return {u: Participant(P.RINGING, Role.CALLEE, rung=True) for u in users}


def test_accept_race_the_second_accept_of_a_one_to_one_call_is_refused() -> None:
    ringing = _ringing_1to1("alice", "bob", "a1")
    first = dec.decide_accept(ringing, "bob", "b1", T0, node=NODE)
    accepted = first.writes[0].after
    assert accepted.state is S.ACCEPTED and accepted.answered_device == "b1"
    with pytest.raises(IllegalTransition) as refused:
        dec.decide_accept(accepted, "bob", "b2", T0, node=NODE)
    assert refused.value.state is S.ACCEPTED
    assert isinstance(dec.decide_accept(accepted, "bob", "b1", T0, node=NODE).result, dec.Again)
    with pytest.raises(IllegalTransition):  # the caller never accepts
        dec.decide_accept(ringing, "alice", "a1", T0, node=NODE)
    with pytest.raises(dec.NoMediaNode):
        dec.decide_accept(ringing, "bob", "b1", T0, node=None)


def test_group_accept_answers_once_stops_the_others_devices_and_caps_the_call() -> None:
    call = _group_call(**_rung("bob", "carol"))
    bob = dec.decide_accept(call, "bob", "b1", T0, node=NODE, member=True, max_participants=3)
    after = bob.writes[0].after
    assert after.state is S.ACCEPTED and after.media_node == NODE.node_id
    assert after.participant("bob").state is P.JOINED
    types = [e.type for e in bob.events]
    assert types == [EventType.CALL_ACCEPTED, EventType.CALL_PARTICIPANT_JOINED]
    elsewhere = [n for n in bob.notices if n.message.get("answered_elsewhere")]
    assert [(n.user, n.except_devices) for n in elsewhere] == [("bob", frozenset({"b1"}))]
    assert any(n.user == "alice" and n.grant and n.devices == {"a1"} for n in bob.notices)
    # carol on the version bob committed: joined; the call was answered already
    carol = dec.decide_accept(after, "carol", "c1", T0, node=None, member=True, max_participants=3)
    full = carol.writes[0].after
    assert full.state is S.ACCEPTED and full.joined() == ["alice", "bob", "carol"]
    dave = {"dave": Participant(P.NOT_RUNG, Role.CALLEE)}
    with pytest.raises(CallFull):
        dec.decide_join(
            replace(full, participants={**full.participants, **dave}),
            "dave", None, T0, node=None, member=True, max_participants=3,
        )  # fmt: skip


def test_join_only_by_a_current_member_and_not_twice() -> None:
    call = _group_call(S.ACTIVE, bob=Participant(P.JOINED, Role.CALLEE, joined_at=T0, since=T0))
    with pytest.raises(dec.NotFound):
        dec.decide_join(call, "mallory", None, T0, node=None, member=False, max_participants=16)
    erin = dec.decide_join(call, "erin", "e1", T0, node=None, member=True, max_participants=16)
    joined = erin.writes[0].after
    assert joined.participant("erin").role is Role.MEMBER
    assert [e.type for e in erin.events] == [EventType.CALL_PARTICIPANT_JOINED]
    with pytest.raises(IllegalTransition) as refused:
        dec.decide_join(joined, "erin", "e1", T0, node=None, member=True, max_participants=16)
    assert refused.value.participant is P.JOINED
    ended = joined.step(A.HANGUP, at=T0)
    with pytest.raises(IllegalTransition) as over:
        dec.decide_join(ended, "frank", None, T0, node=None, member=True, max_participants=16)
    assert over.value.state is S.ENDED


def test_decline_then_rejoin_while_the_call_lasts() -> None:
    call = _group_call(
        S.ACTIVE, **_rung("bob"), carol=Participant(P.JOINED, Role.CALLEE, joined_at=T0, since=T0)
    )
    declined = dec.decide_decline(call, "bob", T0).writes[0].after
    assert declined.state is S.ACTIVE and declined.participant("bob").state is P.DECLINED
    with pytest.raises(IllegalTransition):
        dec.decide_decline(declined, "bob", T0)
    with pytest.raises(IllegalTransition):
        dec.decide_decline(declined, "alice", T0)  # the starter never declines
    back = dec.decide_join(declined, "bob", "b1", T0, node=None, member=True, max_participants=16)
    assert back.writes[0].after.participant("bob").state is P.JOINED


def test_participants_leave_one_by_one_and_the_call_ends_with_the_last() -> None:
    t1, t2, t3 = (T0 + timedelta(seconds=s) for s in (10, 25, 40))
    call = _group_call(
        S.ACTIVE,
        bob=Participant(P.JOINED, Role.CALLEE, joined_at=T0, since=T0),
        **_rung("carol"),
    )
    call = replace(call, answered_at=T0)
    first = dec.decide_hangup(call, "alice", t1)
    after = first.writes[0].after
    assert after.state is S.ACTIVE and after.participant("alice").state is P.LEFT
    assert [e.type for e in first.events] == [EventType.CALL_PARTICIPANT_LEFT]
    back = dec.decide_join(after, "alice", "a1", t2, node=None, member=True, max_participants=16)
    after = back.writes[0].after
    after = dec.decide_hangup(after, "alice", t3).writes[0].after
    assert after.participant("alice").presence_s(t3) == 10 + 15
    last = dec.decide_hangup(after, "bob", t3)
    ended = last.writes[0].after
    assert (ended.state, ended.end_reason) == (S.ENDED, EndReason.USER_HANGUP)
    assert ended.participant("carol").state is P.MISSED  # still ringing at the end
    assert [e.type for e in last.events] == [
        EventType.CALL_PARTICIPANT_LEFT,
        EventType.CALL_MISSED,
        EventType.CALL_ENDED,
    ]
    assert last.events[-1].group == "g1" and last.events[-1].callee is None  # type: ignore[attr-defined]
    item = dec.history_item(ended, "alice", t3)
    assert item is not None and item["duration_s"] == 25 and item["direction"] == "outgoing"
    missed = dec.history_item(ended, "carol", t3)
    assert missed is not None and missed["missed"] is True and missed["duration_s"] == 0


def test_the_starter_leaving_before_any_answer_cancels_the_call() -> None:
    call = _group_call(**_rung("bob", "carol"), dave=Participant(P.NOT_RUNG, Role.CALLEE))
    step = dec.decide_hangup(call, "alice", T0)
    after = step.writes[0].after
    assert after.state is S.CANCELLED
    cancelled = [e for e in step.events if e.type is EventType.CALL_CANCELLED]
    assert sorted(e.callee for e in cancelled) == ["bob", "carol"]  # type: ignore[attr-defined]
    assert dec.history_item(after, "dave", T0) is None  # never rung, never joined


def test_missed_per_invitee_at_the_ring_deadline_exactly_once() -> None:
    late = T0 + timedelta(seconds=31)
    call = _group_call(
        S.ACTIVE,
        **_rung("bob", "carol"),
        dave=Participant(P.JOINED, Role.CALLEE, joined_at=T0, since=T0),
    )
    assert dec.decide_ring_timeout(call, T0).result is dec.Outcome.NOT_DUE
    step = dec.decide_ring_timeout(call, late)
    assert step.result is dec.Outcome.FIRED
    after = step.writes[0].after
    assert after.state is S.ACTIVE  # someone answered: it goes on
    missed = [e for e in step.events if e.type is EventType.CALL_MISSED]
    assert sorted(e.callee for e in missed) == ["bob", "carol"]  # type: ignore[attr-defined]
    assert dec.decide_ring_timeout(after, late).result is dec.Outcome.NOTHING  # once
    # nobody answered: the call ends missed
    lonely = _group_call(**_rung("bob"))
    ended = dec.decide_ring_timeout(lonely, late)
    final = ended.writes[0].after
    assert (final.state, final.end_reason) == (S.MISSED, EndReason.MISSED)
    assert [e.type for e in ended.events] == [EventType.CALL_MISSED, EventType.CALL_ENDED]


def test_a_one_to_one_ring_timeout_is_missed_once() -> None:
    ringing = _ringing_1to1("alice", "bob", "a1")
    late = T0 + timedelta(seconds=31)
    assert dec.decide_ring_timeout(ringing, T0).result is dec.Outcome.NOT_DUE
    step = dec.decide_ring_timeout(ringing, late)
    missed = step.writes[0].after
    assert missed.state is S.MISSED and missed.participant("bob").state is P.MISSED
    assert dec.decide_ring_timeout(missed, late).result is dec.Outcome.NOTHING


def test_a_group_call_signal_needs_to_and_goes_between_joined_participants() -> None:
    call = _group_call(
        S.ACTIVE,
        bob=Participant(P.JOINED, Role.CALLEE, joined_at=T0, since=T0, device="b1"),
        **_rung("carol"),
    )
    with pytest.raises(dec.BadSignal):
        dec.signal_route(call, "alice", None, ring_devices=5)
    route = dec.signal_route(call, "alice", "bob", ring_devices=5)
    assert (route.user, route.devices) == ("bob", frozenset({"b1"}))
    with pytest.raises(IllegalTransition):
        dec.signal_route(call, "alice", "carol", ring_devices=5)  # carol is not joined
    with pytest.raises(IllegalTransition):
        dec.signal_route(call, "carol", "alice", ring_devices=5)


def test_a_move_sends_every_joined_participant_a_fresh_grant() -> None:
    call = _group_call(
        S.ACTIVE,
        bob=Participant(P.JOINED, Role.CALLEE, joined_at=T0, since=T0, device="b1"),
        carol=Participant(P.LEFT, Role.CALLEE, joined_at=T0),
    )
    call = replace(call, media_node="n0", media_url="u0")
    step = dec.decide_move(call, "n0", NODE, MediaMoveReason.NODE_LOST, T0, grace_s=30)
    assert step.result.moved is not None and step.result.moved.media_node == NODE.node_id
    assert sorted((n.user, n.devices, n.grant) for n in step.notices) == [  # type: ignore[type-var]
        ("alice", frozenset({"a1"}), True),
        ("bob", frozenset({"b1"}), True),
    ]


def test_a_member_who_joined_leaves_like_anyone_joined() -> None:
    call = _group_call(S.ACTIVE, bob=Participant(P.JOINED, Role.CALLEE, joined_at=T0, since=T0))
    erin = dec.decide_join(call, "erin", None, T0, node=None, member=True, max_participants=16)
    joined = erin.writes[0].after
    assert Ac.MEMBER in joined.actors("erin")  # no membership read needed to leave
    left = dec.decide_hangup(joined, "erin", T0).writes[0].after
    assert left.participant("erin").state is P.LEFT and left.state is S.ACTIVE
