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
    next_state,
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
        assert after.answered_at == at


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
