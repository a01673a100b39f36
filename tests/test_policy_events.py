"""Policy's consumers against the real broker and a spawned policy process: platform facts
as events (reordered and duplicated), and exactly one verdict per call_requested."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from shared import telemetry
from shared.bus import Delivery
from shared.contracts import (
    BlockCreated,
    BlockDeleted,
    CallAuthorized,
    CallRejected,
    CallRequested,
    ContactAdded,
    ContactRemoved,
    DmSent,
    Event,
    FollowCreated,
    FollowDeleted,
    MediaKind,
    UserUpdated,
    parse_event,
)
from tests.conftest import auth
from tests.support.policy import PolicyRig, verdicts_in
from tests.support.signaling import EventTap
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e


T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def test_platform_events_reordered_and_duplicated_end_in_the_newest_state(
    rig: PolicyRig,
) -> None:
    policy = rig.spawn("policy")
    platform = await rig.bus("platform")
    follow_created = FollowCreated(user_id="bob", other_id="alice", occurred_at=at(1))
    events: list[Event] = [
        # follow.deleted before its follow.created; the created is delivered twice
        FollowDeleted(user_id="bob", other_id="alice", occurred_at=at(2)),
        follow_created,
        follow_created,
        # the same fact again under another event id (the platform resent it)
        FollowCreated(user_id="bob", other_id="alice", occurred_at=at(1)),
        # contacts: added, removed, then an old add redelivered late
        ContactAdded(user_id="bob", other_id="carol", occurred_at=at(1)),
        ContactRemoved(user_id="bob", other_id="carol", occurred_at=at(3)),
        ContactAdded(user_id="bob", other_id="carol", occurred_at=at(1)),
        # a contact that simply holds, delivered twice
        ContactAdded(user_id="bob", other_id="dave", occurred_at=at(1)),
        # blocks: the newest (created) arrives first, an older delete later
        BlockCreated(user_id="erin", other_id="alice", occurred_at=at(5)),
        BlockDeleted(user_id="erin", other_id="alice", occurred_at=at(4)),
        # user updates out of order: the newest says premium and verified
        UserUpdated(user_id="alice", premium=True, verified=True, occurred_at=at(10)),
        UserUpdated(user_id="alice", premium=False, verified=False, occurred_at=at(9)),
        # DMs, one duplicated
        DmSent(sender="bob", recipient="alice", occurred_at=at(1)),
        DmSent(sender="bob", recipient="alice", occurred_at=at(2)),
    ]
    events.insert(8, events[7])
    # Each arrives after the one before was handled: the arrival order is the list's.
    for event in events:
        await platform.publish(event)
        await rig.handled("facts", event)

    headers = auth(rig.token("platform-svc", scope="platform"))

    http = httpx.AsyncClient(base_url=policy.url)

    async def relation(user: str, rel: str, other: str) -> bool:
        url = f"/v1/platform/users/{user}/{rel}/{other}"
        return bool((await http.get(url, headers=headers)).json()["present"])

    assert await relation("bob", "following", "alice") is False
    assert await relation("bob", "contacts", "carol") is False
    assert await relation("bob", "contacts", "dave") is True
    assert await relation("erin", "blocks", "alice") is True
    user = (await http.get("/v1/platform/users/alice", headers=headers)).json()
    assert (user["premium"], user["verified"]) == (True, True)
    # the facts together: bob messaged alice, but follows her no more and she is no contact
    decision = (await http.get("/v1/platform/decisions/alice/bob", headers=headers)).json()
    assert decision["detail"] == "not_allowed_by_settings"
    metrics = (await http.get("/metrics")).text
    # recognised as stale: the late follow.created and its resend (the duplicate delivery
    # never reached the handler), the late contact.added, the older block.deleted and
    # the older user.updated
    for event_type, count in (
        ("follow.created", 2),
        ("contact.added", 1),
        ("block.deleted", 1),
        ("user.updated", 1),
    ):
        assert f'dmcall_policy_stale_facts_total{{event_type="{event_type}"}} {count}.0' in metrics

    # a burst handled concurrently, in shuffled order: the newest (a delete) wins
    burst: list[Event] = [
        (FollowCreated if n % 2 else FollowDeleted)(
            user_id="frank", other_id="alice", occurred_at=at(100 + n)
        )
        for n in range(1, 21)
    ]
    random.Random(7).shuffle(burst)
    for event in burst:
        await platform.publish(event)
    await rig.handled("facts", *burst)
    assert await relation("frank", "following", "alice") is False

    # a newer follow.created now takes, and the permission follows it
    newer = FollowCreated(user_id="bob", other_id="alice", occurred_at=at(20))
    await platform.publish(newer)
    await rig.handled("facts", newer)
    permission = await http.get("/v1/permissions/bob", headers=auth(rig.token("alice")))
    await http.aclose()
    assert permission.json() == {
        "callee": "bob",
        "allowed": True,
        "media": ["audio", "video"],
        "reason": None,
    }


async def test_call_requested_delivered_twice_yields_exactly_one_verdict_in_the_same_trace(
    rig: PolicyRig, tap: EventTap
) -> None:
    policy = rig.spawn("policy")
    headers = auth(rig.token("platform-svc", scope="platform"))
    http = httpx.AsyncClient(base_url=policy.url)
    for method, path, body in (
        ("PUT", "/v1/platform/users/alice", {"premium": True, "verified": False}),
        ("POST", "/v1/platform/dms", {"sender": "bob", "recipient": "alice"}),
        ("PUT", "/v1/platform/users/bob/following/alice", None),
        ("POST", "/v1/platform/dms", {"sender": "dave", "recipient": "alice"}),
        ("PUT", "/v1/platform/users/dave/following/alice", None),
    ):
        response = await http.request(method, path, headers=headers, json=body)
        assert response.is_success
    dave = auth(rig.token("dave"))
    response = await http.put("/v1/settings", headers=dave, json={"enabled": False})
    assert response.is_success
    await http.aclose()

    verdicts: list[tuple[Event, str | None]] = []

    async def on_verdict(event: CallAuthorized | CallRejected, delivery: Delivery) -> None:
        verdicts.append((event, telemetry.current_trace_id()))

    await rig.bus("signaling-test", verdicts={CallAuthorized: on_verdict, CallRejected: on_verdict})
    # The bus deduplicates by event id, which would hide the same verdict published twice:
    # the tap (a plain queue on the exchange) sees every message policy publishes.
    signaling = await rig.bus("signaling-publisher")
    telemetry.setup_tracing("test-signaling", None)
    tracer = telemetry.tracer("test")

    async def request(call_id: str, callee: str) -> tuple[CallRequested, str]:
        with tracer.start_as_current_span("place call"):
            trace_id = telemetry.current_trace_id()
            assert trace_id is not None
            event = CallRequested(
                call_id=call_id, caller="alice", callee=callee, media=MediaKind.VIDEO
            )
            await signaling.publish(event)
            await signaling.publish(event)  # the same message delivered twice
        return event, trace_id

    to_bob, bob_trace = await request("call-bob", "bob")
    to_dave, dave_trace = await request("call-dave", "dave")
    # and call_requested for call-bob again under a new event id (signaling retried, after
    # the first was decided: a retry sent concurrently could win the verdict, in its trace)
    await rig.handled("verdicts", to_bob)
    retry = CallRequested(call_id="call-bob", caller="alice", callee="bob", media=MediaKind.VIDEO)
    await signaling.publish(retry)
    await rig.handled("verdicts", to_bob, to_dave, retry)
    # a sentinel call after them; verdicts are handled concurrently, so they may arrive in
    # any order: wait for all three, then give a duplicate the time to show up.
    await request("call-sentinel", "carol")
    expected = {"call-bob", "call-dave", "call-sentinel"}
    await eventually(lambda: {e.call_id for e, _ in verdicts} >= expected)  # type: ignore[attr-defined]
    await tap.settle(signaling.publish)  # a duplicate verdict would be on the tap by now

    by_call: dict[str, list[tuple[Event, str | None]]] = {}
    for event, trace_id in verdicts:
        by_call.setdefault(event.call_id, []).append((event, trace_id))  # type: ignore[attr-defined]
    assert sorted(by_call) == ["call-bob", "call-dave", "call-sentinel"]
    assert [len(v) for v in by_call.values()] == [1, 1, 1], by_call

    ((authorized, trace_b),) = by_call["call-bob"]
    assert isinstance(authorized, CallAuthorized)
    assert (authorized.caller, authorized.callee, authorized.media) == (
        "alice",
        "bob",
        MediaKind.VIDEO,
    )
    assert trace_b == bob_trace

    ((rejected, trace_d),) = by_call["call-dave"]
    assert isinstance(rejected, CallRejected)
    assert rejected.reason.value == "callee_unavailable"
    assert rejected.detail is not None and rejected.detail.value == "calls_disabled"
    assert trace_d == dave_trace

    ((never, _),) = by_call["call-sentinel"]
    assert isinstance(never, CallRejected) and never.reason.value == "no_prior_dm"

    # the judged call can be reported only by its parties, about each other; to anyone
    # else it is a call that does not exist (F7)
    async with httpx.AsyncClient(base_url=policy.url) as http:
        report = {"call_id": "call-bob", "reported_user": "alice", "reason": "spam"}
        outsider = await http.post("/v1/reports", headers=auth(rig.token("carol")), json=report)
        assert outsider.status_code == 404, outsider.text
        third = await http.post(
            "/v1/reports", headers=auth(rig.token("bob")), json={**report, "reported_user": "carol"}
        )
        assert third.status_code == 403
        party = await http.post("/v1/reports", headers=auth(rig.token("bob")), json=report)
        assert party.status_code == 201, party.text

    async with httpx.AsyncClient(base_url=policy.url) as http:
        metrics = (await http.get("/metrics")).text
    assert 'dmcall_policy_verdicts_total{detail="",outcome="authorized"} 1.0' in metrics
    assert 'dmcall_policy_verdicts_total{detail="calls_disabled",outcome="rejected"} 1.0' in metrics

    published = sorted(parse_event(m).call_id for m in verdicts_in(tap))  # type: ignore[attr-defined]
    assert published == ["call-bob", "call-dave", "call-sentinel"]
