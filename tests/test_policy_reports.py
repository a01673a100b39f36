"""Reports of calls against a spawned policy process and the real broker: only a party of a
call policy really judged (and authorized) may report it, only about the other party,
however old the call; a report right after the call rang is accepted; reports are
rate-limited per reporter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from shared.bus import Delivery
from shared.contracts import CallAuthorized, CallReported, EventType
from tests.conftest import auth
from tests.support.policy import PolicyRig, Token
from tests.support.signaling import EventTap
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e


NOT_FOUND = {"error": "not_found", "message": "no call of yours with this id"}


async def callable_pair(http: httpx.AsyncClient, token: Token, caller: str, callee: str) -> None:
    """caller premium, callee messaged caller and follows caller: caller -> callee allowed."""
    platform = auth(token("platform-svc", scope="platform"))
    for method, path, body in (
        ("PUT", f"/v1/platform/users/{caller}", {"premium": True, "verified": False}),
        ("POST", "/v1/platform/dms", {"sender": callee, "recipient": caller}),
        ("PUT", f"/v1/platform/users/{callee}/following/{caller}", None),
    ):
        response = await http.request(method, path, headers=platform, json=body)
        assert response.is_success, response.text


def reporting(http: httpx.AsyncClient, token: Token) -> Callable[..., Any]:
    async def report(reporter: str, call_id: str, reported_user: str) -> httpx.Response:
        body = {"call_id": call_id, "reported_user": reported_user, "reason": "harassment"}
        return await http.post("/v1/reports", headers=auth(token(reporter)), json=body)

    return report


async def test_f7_only_a_party_of_a_judged_call_may_report_it_and_only_the_other_party(
    rig: PolicyRig, tap: EventTap
) -> None:
    policy = rig.spawn("policy")
    received: list[CallReported] = []

    async def on_reported(event: CallReported, delivery: Delivery) -> None:
        received.append(event)

    bus = await rig.bus("trust-and-safety", reports={CallReported: on_reported})
    async with httpx.AsyncClient(base_url=policy.url) as http:
        report = reporting(http, rig.token)
        await callable_pair(http, rig.token, "alice", "bob")
        answered = await rig.judged_call(bus, "alice", "bob")
        rejected = await rig.judged_call(bus, "alice", "carol")  # no DM

        # Made-up calls: 404, and nothing stored, blocked or published.
        for n in range(5):
            made_up = await report("alice", f"made-up-{n}", "bob")
            assert made_up.status_code == 404, made_up.text
            assert made_up.json() == NOT_FOUND
        # An outsider gets the very same answer for a real call: it learns nothing of it.
        outsider = await report("carol", answered, "alice")
        assert (outsider.status_code, outsider.json()) == (404, NOT_FOUND)
        # A call policy rejected never reached the callee: nothing to report, either side.
        assert (await report("alice", rejected, "carol")).status_code == 404
        assert (await report("carol", rejected, "alice")).status_code == 404
        # A party may report only the other party.
        wrong = await report("bob", answered, "carol")
        assert wrong.status_code == 403, wrong.text
        assert wrong.json() == {
            "error": "forbidden",
            "message": "you can report only the other party of this call",
        }
        assert (await report("bob", answered, "bob")).status_code == 422
        for user in ("alice", "bob", "carol"):
            blocks = await http.get("/v1/blocks", headers=auth(rig.token(user)))
            assert blocks.json() == {"blocked": []}, user

        # Both parties may report each other.
        by_callee = await report("bob", answered, "alice")
        assert by_callee.status_code == 201, by_callee.text
        assert (await report("alice", answered, "bob")).status_code == 201
        assert (await http.get("/v1/blocks", headers=auth(rig.token("bob")))).json() == {
            "blocked": ["alice"]
        }

        # However old: the verdict is forgotten after POLICY_VERDICT_TTL_S, the parties are
        # kept (no expiry by default, like signaling's call history).
        await callable_pair(http, rig.token, "erin", "dave")
        old = await rig.judged_call(bus, "erin", "dave")
        await rig.redis.delete(rig.key("policy", "verdict", old))
        assert await rig.redis.ttl(rig.key("policy", "call", old)) == -1
        assert (await report("dave", old, "erin")).status_code == 201
        # A call judged before the parties were recorded (its verdict still remembered).
        await callable_pair(http, rig.token, "frank", "dave")
        legacy = await rig.judged_call(bus, "frank", "dave")
        await rig.redis.delete(rig.key("policy", "call", legacy))
        assert (await report("dave", legacy, "frank")).status_code == 201
        assert (await report("erin", legacy, "frank")).status_code == 404

        openapi = (await http.get("/openapi.json")).json()
        answers = openapi["paths"]["/v1/reports"]["post"]["responses"]
        assert {"200", "201", "403", "404", "422", "429", "503"} <= set(answers)

    expected = {
        (answered, "bob", "alice"),
        (answered, "alice", "bob"),
        (old, "dave", "erin"),
        (legacy, "dave", "frank"),
    }
    await eventually(lambda: len(received) >= len(expected))
    await tap.settle(bus.publish)  # anything extra policy published is on the tap by now
    assert sorted((e.call_id, e.reporter, e.reported_user) for e in received) == sorted(expected)
    reports = [m for m in tap.messages if m["type"] == EventType.CALL_REPORTED.value]
    assert sorted((m["call_id"], m["reporter"], m["reported_user"]) for m in reports) == sorted(
        expected
    )


async def test_f7_a_report_right_after_the_call_rang_is_accepted(rig: PolicyRig) -> None:
    """The callee reports as soon as the call rings: the parties are recorded before
    call_authorized is published, and signaling rings only on call_authorized."""
    policy = rig.spawn("policy")
    answers: list[int] = []

    async with httpx.AsyncClient(base_url=policy.url) as http:
        report = reporting(http, rig.token)

        async def on_authorized(event: CallAuthorized, delivery: Delivery) -> None:
            answers.append((await report(event.callee, event.call_id, event.caller)).status_code)

        bus = await rig.bus("signaling-test", verdicts={CallAuthorized: on_authorized})
        await callable_pair(http, rig.token, "alice", "bob")
        for _ in range(3):
            await rig.judged_call(bus, "alice", "bob")
            # each report blocks alice for bob; bob unblocks her for the next call
            await eventually(lambda: answers)
            assert answers.pop() == 201
            await http.delete("/v1/blocks/alice", headers=auth(rig.token("bob")))


async def test_f7_reports_are_rate_limited_per_reporter(rig: PolicyRig) -> None:
    policy = rig.spawn("policy", POLICY_REPORTS_PER_HOUR="2")
    bus = await rig.bus("signaling-test")
    async with httpx.AsyncClient(base_url=policy.url) as http:
        report = reporting(http, rig.token)
        await callable_pair(http, rig.token, "alice", "bob")
        calls = [await rig.judged_call(bus, "alice", "bob") for _ in range(3)]

        assert (await report("alice", calls[0], "bob")).status_code == 201
        assert (await report("alice", calls[1], "bob")).status_code == 201
        limited = await report("alice", calls[2], "bob")
        assert limited.status_code == 429, limited.text
        retry_after = int(limited.headers["Retry-After"])
        assert 1 <= retry_after <= 3600
        assert limited.json() == {
            "error": "rate_limited",
            "message": "too many reports; try again later",
            "retry_after_s": retry_after,
        }
        # every new report counts, a made-up one too; a repeat of a report is no new one
        assert (await report("alice", "made-up", "bob")).status_code == 429
        again = await report("alice", calls[0], "bob")
        assert again.status_code == 200, again.text
        # the limit is the reporter's own
        assert (await report("bob", calls[2], "alice")).status_code == 201
