"""The call state machine, without I/O: every state x every action, allowed or refused."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from services.signaling.domain import (
    END_REASONS,
    TRANSITIONS,
    Call,
    CallAction,
    IllegalTransition,
    glare_winner,
    media_connected_action,
    media_lost,
    move_media,
    next_state,
    upgrade_to_video,
)
from shared.contracts import FINAL_STATES, CallState, EndReason, MediaKind
from shared.ids import new_call_id

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


@pytest.mark.parametrize("state", [S.ACCEPTED, S.ACTIVE], ids=str)
def test_moving_media_keeps_the_call_and_starts_a_rejoin_deadline(state: CallState) -> None:
    call = _on_node(state)
    deadline = T0 + timedelta(seconds=33)
    moved = move_media(
        call, leaving="node-1", node_id="node-2", media_url="u2", at=T0, rejoin_deadline=deadline
    )
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
    args = {"leaving": "node-1", "node_id": "node-3", "media_url": "u3", "at": T0}
    assert move_media(moved_before, rejoin_deadline=T0, **args) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("state", [s for s in CallState if s not in (S.ACCEPTED, S.ACTIVE)])
def test_a_call_not_in_progress_is_never_moved(state: CallState) -> None:
    call = _on_node(state)
    args = {"leaving": "node-1", "node_id": "node-2", "media_url": "u2", "at": T0}
    assert move_media(call, rejoin_deadline=T0, **args) is None  # type: ignore[arg-type]


def test_media_on_the_new_node_ends_the_rejoin_deadline() -> None:
    call = _on_node(S.ACTIVE)
    moved = move_media(
        call, leaving="node-1", node_id="node-2", media_url="u2", at=T0, rejoin_deadline=T0
    )
    assert moved is not None
    assert media_connected_action(moved) is A.MEDIA_RESUMED
    resumed = moved.step(A.MEDIA_RESUMED, at=T0)
    assert (resumed.state, resumed.rejoin_deadline) == (S.ACTIVE, None)
    # An active call with no move pending: a repeated connected event, refused.
    with pytest.raises(IllegalTransition):
        resumed.step(media_connected_action(resumed), at=T0)
    # Moved before its first media: connecting makes it active and ends the deadline too.
    accepted = move_media(
        _on_node(S.ACCEPTED),
        leaving="node-1",
        node_id="node-2",
        media_url="u2",
        at=T0,
        rejoin_deadline=T0,
    )
    assert accepted is not None and media_connected_action(accepted) is A.MEDIA_CONNECTED
    active = accepted.step(A.MEDIA_CONNECTED, at=T0)
    assert (active.state, active.rejoin_deadline) == (S.ACTIVE, None)


def test_a_moved_call_that_times_out_ends_media_timeout() -> None:
    moved = move_media(
        _on_node(S.ACTIVE),
        leaving="node-1",
        node_id="node-2",
        media_url="u2",
        at=T0,
        rejoin_deadline=T0,
    )
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
    moved = move_media(
        call, leaving="node-1", node_id="node-2", media_url="u2", at=later, rejoin_deadline=later
    )
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
    moved = move_media(
        waiting, leaving="node-1", node_id="node-2", media_url="u2", at=later, rejoin_deadline=later
    )
    assert moved is not None and moved.media_node == "node-2" and moved.rejoin_deadline == later


def test_media_lost_is_nothing_for_another_node_or_a_call_not_in_progress() -> None:
    assert media_lost(_on_node(S.ACTIVE), node_id="node-9", at=T0, rejoin_deadline=T0) is None
    for state in (S.RINGING, S.ENDED):
        assert media_lost(_on_node(state), node_id="node-1", at=T0, rejoin_deadline=T0) is None
