"""Event contracts: round-trips, strictness where it matters, tolerance where it must be."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from shared import contracts as c

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)

SAMPLES: dict[c.EventType, dict[str, Any]] = {
    c.EventType.CALL_MEDIA_PEER: {
        "call_id": "c1",
        "node_id": "media-1",
        "user": "alice",
        "connection": "reconnecting",
    },
    c.EventType.MEDIA_NODE_DRAINING: {"node_id": "media-1", "call_ids": ["c1", "c2"]},
    c.EventType.CALL_REQUESTED: {
        "call_id": "c1",
        "caller": "alice",
        "callee": "bob",
        "media": "audio",
    },
    c.EventType.CALL_AUTHORIZED: {
        "call_id": "c1",
        "caller": "alice",
        "callee": "bob",
        "media": "video",
    },
    c.EventType.CALL_REJECTED: {
        "call_id": "c1",
        "caller": "alice",
        "callee": "bob",
        "reason": "callee_unavailable",
        "detail": "calls_disabled",
    },
    c.EventType.CALL_RINGING: {
        "call_id": "c1",
        "caller": "alice",
        "callee": "bob",
        "media": "audio",
        "ring_deadline": "2026-11-21T12:01:00Z",
    },
    c.EventType.CALL_ACCEPTED: {
        "call_id": "c1",
        "caller": "alice",
        "callee": "bob",
        "device_id": "d1",
    },
    c.EventType.CALL_DECLINED: {"call_id": "c1", "caller": "alice", "callee": "bob"},
    c.EventType.CALL_CANCELLED: {"call_id": "c1", "caller": "alice", "callee": "bob"},
    c.EventType.CALL_MISSED: {
        "call_id": "c1",
        "caller": "alice",
        "callee": "bob",
        "media": "video",
    },
    c.EventType.CALL_ENDED: {
        "call_id": "c1",
        "caller": "alice",
        "callee": "bob",
        "reason": "user_hangup",
        "duration_s": 12.5,
    },
    c.EventType.CALL_MEDIA_CONNECTED: {"call_id": "c1", "node_id": "media-1"},
    c.EventType.CALL_MEDIA_FAILED: {"call_id": "c1", "node_id": "media-1", "reason": "ice_failed"},
    c.EventType.CALL_REPORTED: {
        "call_id": "c1",
        "reporter": "bob",
        "reported_user": "alice",
        "reason": "spam",
    },
    c.EventType.CALL_PARTICIPANT_JOINED: {"call_id": "c1", "user": "erin", "group": "g1"},
    c.EventType.CALL_PARTICIPANT_LEFT: {"call_id": "c1", "user": "erin"},
    c.EventType.USER_UPDATED: {"user_id": "alice", "premium": True, "verified": False},
    c.EventType.GROUP_MEMBER_ADDED: {"group_id": "g1", "user_id": "erin"},
    c.EventType.GROUP_MEMBER_REMOVED: {"group_id": "g1", "user_id": "erin"},
    c.EventType.GROUP_MESSAGE_SENT: {"group_id": "g1", "sender": "erin"},
    c.EventType.FOLLOW_CREATED: {"user_id": "bob", "other_id": "alice"},
    c.EventType.FOLLOW_DELETED: {"user_id": "bob", "other_id": "alice"},
    c.EventType.CONTACT_ADDED: {"user_id": "bob", "other_id": "alice"},
    c.EventType.CONTACT_REMOVED: {"user_id": "bob", "other_id": "alice"},
    c.EventType.BLOCK_CREATED: {"user_id": "bob", "other_id": "alice"},
    c.EventType.BLOCK_DELETED: {"user_id": "bob", "other_id": "alice"},
    c.EventType.DM_SENT: {"sender": "bob", "recipient": "alice"},
}


def _payload(event_type: c.EventType, **extra: Any) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "type": event_type.value,
        "version": c.current_version(event_type),
        "occurred_at": NOW.isoformat(),
        **SAMPLES[event_type],
        **extra,
    }


def test_every_event_type_has_a_model_and_a_sample() -> None:
    assert set(c.EVENT_MODELS) == set(c.EventType) == set(SAMPLES)


@pytest.mark.parametrize("event_type", list(c.EventType))
def test_round_trips_through_json(event_type: c.EventType) -> None:
    event = c.parse_event(json.dumps(_payload(event_type)))
    assert type(event) is c.EVENT_MODELS[event_type]
    again = c.parse_event(event.to_json())
    assert again == event
    assert again.occurred_at == NOW


@pytest.mark.parametrize("event_type", list(c.EventType))
def test_a_missing_field_is_rejected_naming_it(event_type: c.EventType) -> None:
    payload = _payload(event_type)
    field = next(iter(SAMPLES[event_type]))
    del payload[field]
    with pytest.raises(c.EventDecodeError, match=field):
        c.parse_event(payload)


@pytest.mark.parametrize(
    ("event_type", "field", "bad"),
    [
        (c.EventType.CALL_REQUESTED, "media", "hologram"),
        (c.EventType.CALL_REQUESTED, "caller", 42),
        (c.EventType.CALL_REQUESTED, "callee", "not a user id!"),
        (c.EventType.CALL_ENDED, "duration_s", "long"),
        (c.EventType.CALL_ENDED, "duration_s", -1),
        (c.EventType.CALL_REJECTED, "reason", "because"),
        (c.EventType.USER_UPDATED, "premium", "maybe"),
        (c.EventType.CALL_RINGING, "ring_deadline", "tomorrow"),
    ],
)
def test_a_wrong_type_is_rejected(event_type: c.EventType, field: str, bad: Any) -> None:
    with pytest.raises(c.EventDecodeError, match=field):
        c.parse_event(_payload(event_type, **{field: bad}))


def test_unknown_extra_fields_are_tolerated() -> None:
    event = c.parse_event(_payload(c.EventType.CALL_REQUESTED, shiny_new_field={"x": 1}))
    assert isinstance(event, c.CallRequested)
    assert "shiny_new_field" not in event.model_dump()


def test_a_newer_version_with_known_fields_still_parses() -> None:
    event = c.parse_event(_payload(c.EventType.CALL_DECLINED, version=7, extra="x"))
    assert event.version == 7


def test_an_old_call_ended_is_upcast() -> None:
    payload = _payload(c.EventType.CALL_ENDED, version=1)
    del payload["duration_s"]
    payload["duration_ms"] = 61_250
    event = c.parse_event(payload)
    assert isinstance(event, c.CallEnded)
    assert event.version == c.current_version(c.EventType.CALL_ENDED)
    assert event.group is None and event.callee == "bob"
    assert event.duration_s == pytest.approx(61.25)
    assert event.media is None  # it predates media: upcasting cannot invent it


@pytest.mark.parametrize(
    "event_type",
    [
        c.EventType.CALL_REQUESTED,
        c.EventType.CALL_AUTHORIZED,
        c.EventType.CALL_REJECTED,
        c.EventType.CALL_RINGING,
        c.EventType.CALL_MISSED,
        c.EventType.CALL_ACCEPTED,
        c.EventType.CALL_DECLINED,
        c.EventType.CALL_CANCELLED,
        c.EventType.CALL_ENDED,
    ],
)
def test_a_v1_call_event_is_upcast_to_a_one_to_one_call(event_type: c.EventType) -> None:
    payload = _payload(event_type, version=1)
    if event_type is c.EventType.CALL_ENDED:
        payload["version"] = 2
    event = c.parse_event(payload)
    assert event.version == c.current_version(event_type) > 1
    assert event.model_dump()["group"] is None and event.model_dump()["callee"] == "bob"


def test_a_group_call_names_its_group_and_no_callee() -> None:
    payload = _payload(c.EventType.CALL_REQUESTED, group="g1", invitees=["bob", "erin"])
    del payload["callee"]
    event = c.parse_event(payload)
    assert isinstance(event, c.CallRequested)
    assert (event.group, event.callee, event.invitees) == ("g1", None, ["bob", "erin"])
    ended = _payload(c.EventType.CALL_ENDED, group="g1")
    del ended["callee"]
    assert c.parse_event(ended).group == "g1"  # type: ignore[attr-defined]


@pytest.mark.parametrize("event_type", [c.EventType.CALL_REQUESTED, c.EventType.CALL_ENDED])
def test_a_call_event_names_exactly_one_of_callee_and_group(event_type: c.EventType) -> None:
    both = _payload(event_type, group="g1")
    with pytest.raises(c.EventDecodeError, match="exactly one of callee"):
        c.parse_event(both)
    neither = _payload(event_type)
    del neither["callee"]
    with pytest.raises(c.EventDecodeError, match="exactly one of callee"):
        c.parse_event(neither)


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[1, 2]", json.dumps({"type": "call_teleported"}).encode(), b"{}"],
)
def test_undecodable_payloads_raise_decode_error(raw: bytes) -> None:
    with pytest.raises(c.EventDecodeError):
        c.parse_event(raw)


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(c.EventDecodeError, match="occurred_at"):
        c.parse_event(_payload(c.EventType.CALL_DECLINED, occurred_at="2026-11-21T12:00:00"))


def test_final_states() -> None:
    assert c.CallState.MISSED.is_final and not c.CallState.RINGING.is_final
