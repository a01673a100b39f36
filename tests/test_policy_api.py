"""The policy API through real HTTP against a spawned policy process: settings, auth,
platform facts and their ordering, permissions, blocks and reports."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from shared.bus import Delivery
from shared.contracts import CallReported
from shared.settings import CommonSettings
from tests.conftest import auth
from tests.support.policy import PolicyRig, Token
from tests.support.redis_server import PrivateRedis
from tests.support.waiting import eventually
from tools.stack import ServiceProcess

pytestmark = pytest.mark.e2e


class Policy:
    """A spawned policy process and the tokens to talk to it."""

    def __init__(self, proc: ServiceProcess, token: Token) -> None:
        self.url = proc.url
        self.token = token
        self.platform = auth(token("platform-svc", scope="platform"))

    def as_user(self, user: str) -> dict[str, str]:
        return auth(self.token(user))

    def put(self, path: str, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
        return httpx.put(f"{self.url}{path}", headers=headers or self.platform, **kw)

    def delete(self, path: str, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
        return httpx.delete(f"{self.url}{path}", headers=headers or self.platform, **kw)

    def post(self, path: str, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", headers=headers or self.platform, **kw)

    def get(self, path: str, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", headers=headers or self.platform, **kw)

    def permission(self, caller: str, callee: str) -> dict[str, Any]:
        response = self.get(f"/v1/permissions/{callee}", self.as_user(caller))
        assert response.status_code == 200, response.text
        return dict(response.json())

    def callable_pair(self, caller: str, callee: str) -> None:
        """caller premium, callee messaged caller and follows caller."""
        assert self.put(
            f"/v1/platform/users/{caller}", json={"premium": True, "verified": False}
        ).is_success
        assert self.post(
            "/v1/platform/dms", json={"sender": callee, "recipient": caller}
        ).is_success
        assert self.put(f"/v1/platform/users/{callee}/following/{caller}").is_success


@pytest.fixture
def policy(spawn: Callable[..., ServiceProcess], token: Token) -> Policy:
    return Policy(spawn("policy"), token)


ALLOWED = {"callee": "bob", "allowed": True, "media": ["audio", "video"], "reason": None}


def unavailable(callee: str) -> dict[str, Any]:
    return {"callee": callee, "allowed": False, "media": [], "reason": "callee_unavailable"}


def test_settings_default_validate_and_belong_to_the_token_user(policy: Policy) -> None:
    alice, bob = policy.as_user("alice"), policy.as_user("bob")
    defaults = {
        "enabled": True,
        "allow_from": {"address_book": True, "following": True, "verified": False},
    }
    assert policy.get("/v1/settings", alice).json() == defaults

    mine = {
        "enabled": True,
        "allow_from": {"address_book": False, "following": False, "verified": True},
    }
    assert policy.put("/v1/settings", alice, json=mine).json() == mine
    assert policy.get("/v1/settings", alice).json() == mine
    # bob's are untouched, and no parameter reaches someone else's settings
    assert policy.get("/v1/settings", bob).json() == defaults
    assert policy.get("/v1/settings?user=alice", bob).json() == defaults
    assert policy.put("/v1/settings?user=bob", alice, json={"enabled": False}).status_code == 200
    assert policy.get("/v1/settings", bob).json() == defaults
    assert policy.get("/v1/settings", alice).json()["enabled"] is False
    # omitted fields take their defaults (PUT replaces)
    assert policy.put("/v1/settings", alice, json={}).json() == defaults

    bad: list[tuple[Any, str]] = [
        ({"enabled": "yes"}, "body.enabled"),
        ({"enabled": 1}, "body.enabled"),
        ({"enabled": None}, "body.enabled"),
        ({"allow_from": {"verified": "true"}}, "body.allow_from.verified"),
        ({"allow_from": []}, "body.allow_from"),
        ({"enabled": True, "ring_tone": "bell"}, "body.ring_tone"),
        ({"allow_from": {"strangers": True}}, "body.allow_from.strangers"),
        ([True], "body"),
    ]
    for body, where in bad:
        response = policy.put("/v1/settings", alice, json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["error"] == "validation_error"
        assert response.json()["message"].startswith(where), (body, response.json())
    malformed = policy.put(
        "/v1/settings", {**alice, "Content-Type": "application/json"}, content=b'{"enabled": tru'
    )
    assert malformed.status_code == 422
    assert malformed.json()["error"] == "validation_error"
    assert policy.get("/v1/settings", alice).json() == defaults  # nothing bad was stored


def test_tokens_are_required_and_checked(policy: Policy, settings: CommonSettings) -> None:
    from shared.auth import issue_token

    forged = issue_token(settings.model_copy(update={"auth_jwt_secret": "x" * 40}), "alice")
    expired = policy.token("alice", ttl_s=-3600)
    for headers in ({}, auth(forged), auth(expired), {"Authorization": "Basic YWxpY2U6eA=="}):
        for method, path in (
            ("GET", "/v1/settings"),
            ("GET", "/v1/permissions/bob"),
            ("PUT", "/v1/blocks/bob"),
            ("PUT", "/v1/platform/users/bob/following/alice"),
        ):
            response = httpx.request(method, f"{policy.url}{path}", headers=headers)
            assert response.status_code == 401, (headers, path, response.text)
            assert response.json()["error"] == "unauthorized"


def test_platform_endpoints_refuse_a_user_token(policy: Policy) -> None:
    alice = policy.as_user("alice")
    writes = [
        ("PUT", "/v1/platform/users/alice", {"premium": True, "verified": True}),
        ("GET", "/v1/platform/users/alice", None),
        ("POST", "/v1/platform/dms", {"sender": "bob", "recipient": "alice"}),
        ("GET", "/v1/platform/decisions/alice/bob", None),
    ]
    for relation in ("following", "contacts", "blocks"):
        for method in ("PUT", "DELETE", "GET"):
            writes.append((method, f"/v1/platform/users/bob/{relation}/alice", None))
    for method, path, body in writes:
        response = httpx.request(method, f"{policy.url}{path}", headers=alice, json=body)
        assert response.status_code == 403, (method, path, response.text)
        assert response.json() == {"error": "forbidden", "message": "platform scope required"}
    # and nothing of it happened
    assert policy.get("/v1/platform/users/alice").json()["premium"] is False
    assert policy.permission("alice", "bob")["reason"] == "caller_not_premium"


def test_bad_user_ids_and_bodies_are_422(policy: Policy) -> None:
    alice = policy.as_user("alice")
    long_id = "a" * 65
    for method, path, headers in (
        ("GET", "/v1/permissions/bo.b", alice),
        ("GET", f"/v1/permissions/{long_id}", alice),
        ("PUT", "/v1/blocks/b%20ob", alice),
        ("PUT", "/v1/platform/users/al!ce", policy.platform),
        ("PUT", f"/v1/platform/users/alice/following/{long_id}", policy.platform),
    ):
        response = httpx.request(
            method, f"{policy.url}{path}", headers=headers, json={"premium": True, "verified": True}
        )
        assert response.status_code == 422, (path, response.text)
        assert "should match pattern" in response.json()["message"]
    for body in (
        {"sender": "bob"},
        {"sender": "bob", "recipient": "al ice"},
        {"sender": 7, "recipient": "alice"},
        {"sender": "bob", "recipient": "alice", "extra": 1},
    ):
        response = policy.post("/v1/platform/dms", json=body)
        assert response.status_code == 422, (body, response.text)
    for body in ({"premium": "yes", "verified": False}, {"premium": True}):
        assert policy.put("/v1/platform/users/alice", json=body).status_code == 422
    naive = policy.put("/v1/platform/users/bob/following/alice?occurred_at=2026-01-01T00:00:00")
    assert naive.status_code == 422
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    response = policy.put("/v1/platform/users/bob/following/alice", params={"occurred_at": future})
    assert response.status_code == 422
    assert "in the future" in response.json()["message"]
    assert policy.put("/v1/blocks/alice", alice).status_code == 422  # not yourself


def test_facts_over_http_drive_the_permission_and_older_facts_never_win(policy: Policy) -> None:
    assert policy.permission("alice", "bob")["reason"] == "caller_not_premium"  # unknown users
    assert policy.put("/v1/platform/users/alice", json={"premium": True, "verified": False}).json()[
        "applied"
    ]
    assert policy.permission("alice", "bob")["reason"] == "no_prior_dm"
    # alice messaging bob is not bob messaging alice
    policy.post("/v1/platform/dms", json={"sender": "alice", "recipient": "bob"})
    assert policy.permission("alice", "bob")["reason"] == "no_prior_dm"
    dm = policy.post("/v1/platform/dms", json={"sender": "bob", "recipient": "alice"})
    assert dm.json() == {"sender": "bob", "recipient": "alice", "first": True}
    assert (
        policy.post("/v1/platform/dms", json={"sender": "bob", "recipient": "alice"}).json()[
            "first"
        ]
        is False
    )
    assert policy.permission("alice", "bob") == unavailable("bob")  # bob allows nobody yet

    t = datetime(2026, 5, 1, tzinfo=UTC)
    at = lambda s: {"occurred_at": (t + timedelta(seconds=s)).isoformat()}  # noqa: E731
    follow = "/v1/platform/users/bob/following/alice"
    # the delete (t+2) arrives before its create (t+1): ends "not following"
    gone = policy.delete(follow, params=at(2)).json()
    assert gone == {
        "user_id": "bob",
        "other_id": "alice",
        "relation": "following",
        "present": False,
        "applied": True,
    }
    late = policy.put(follow, params=at(1)).json()
    assert (late["present"], late["applied"]) == (False, False)
    assert policy.permission("alice", "bob") == unavailable("bob")
    # a newer follow takes; a duplicate of it changes nothing
    assert policy.put(follow, params=at(3)).json()["present"] is True
    assert policy.put(follow, params=at(3)).json()["applied"] is False
    assert policy.permission("alice", "bob") == ALLOWED
    # same instant: the removal wins whichever arrives first
    assert policy.delete(follow, params=at(4)).json()["present"] is False
    assert policy.put(follow, params=at(4)).json()["present"] is False
    policy.put(follow)  # now
    assert policy.permission("alice", "bob") == ALLOWED

    # premium: an older update does not undo a newer one
    user = "/v1/platform/users/alice"
    policy.put(
        user,
        json={
            "premium": False,
            "verified": False,
            "occurred_at": (datetime.now(UTC) + timedelta(seconds=5)).isoformat(),
        },
    )
    stale = policy.put(user, json={"premium": True, "verified": True, **at(0)}).json()
    assert (stale["premium"], stale["verified"], stale["applied"]) == (False, False, False)
    assert policy.permission("alice", "bob")["reason"] == "caller_not_premium"
    assert policy.get("/v1/platform/decisions/alice/bob").json()["detail"] == "caller_not_premium"


def test_every_rule_reads_right_through_the_api(policy: Policy) -> None:
    policy.callable_pair("alice", "bob")
    assert policy.permission("alice", "bob") == ALLOWED
    assert policy.permission("alice", "alice") == {
        "callee": "alice",
        "allowed": False,
        "media": [],
        "reason": "self_call",
    }
    decision = lambda: policy.get("/v1/platform/decisions/alice/bob").json()["detail"]  # noqa: E731

    # bob turns calls off: alice only learns "unavailable"; support sees why
    bob = policy.as_user("bob")
    policy.put("/v1/settings", bob, json={"enabled": False})
    assert policy.permission("alice", "bob") == unavailable("bob")
    assert decision() == "calls_disabled"
    # bob allows only verified users; alice becomes verified
    verified_only = {
        "enabled": True,
        "allow_from": {"address_book": False, "following": False, "verified": True},
    }
    policy.put("/v1/settings", bob, json=verified_only)
    assert decision() == "not_allowed_by_settings"
    policy.put("/v1/platform/users/alice", json={"premium": True, "verified": True})
    assert policy.permission("alice", "bob") == ALLOWED
    # address book only; bob has alice in contacts
    policy.put(
        "/v1/settings",
        bob,
        json={"allow_from": {"address_book": True, "following": False, "verified": False}},
    )
    assert decision() == "not_allowed_by_settings"
    policy.put("/v1/platform/users/bob/contacts/alice")
    assert policy.permission("alice", "bob") == ALLOWED
    # platform blocks, either direction
    policy.put("/v1/platform/users/bob/blocks/alice")
    assert policy.permission("alice", "bob") == unavailable("bob")
    assert decision() == "callee_blocked_caller"
    policy.delete("/v1/platform/users/bob/blocks/alice")
    policy.put("/v1/platform/users/alice/blocks/bob")
    assert policy.permission("alice", "bob") == unavailable("bob")
    assert decision() == "caller_blocked_callee"
    policy.delete("/v1/platform/users/alice/blocks/bob")
    assert policy.permission("alice", "bob") == ALLOWED

    # bob's own call block (not the platform's) and its removal
    assert policy.put("/v1/blocks/alice", bob).json() == {"user": "alice", "blocked": True}
    assert policy.get("/v1/blocks", bob).json() == {"blocked": ["alice"]}
    assert policy.permission("alice", "bob") == unavailable("bob")
    assert decision() == "callee_blocked_caller"
    assert policy.delete("/v1/blocks/alice", bob).json() == {"user": "alice", "blocked": False}
    assert policy.get("/v1/blocks", bob).json() == {"blocked": []}
    assert policy.permission("alice", "bob") == ALLOWED


def test_the_premium_switch_off_opens_calling_to_everyone(
    spawn: Callable[..., ServiceProcess], token: Token
) -> None:
    policy = Policy(spawn("policy", POLICY_REQUIRE_PREMIUM="false"), token)
    policy.post("/v1/platform/dms", json={"sender": "bob", "recipient": "carl"})
    policy.put("/v1/platform/users/bob/contacts/carl")
    assert policy.get("/v1/platform/users/carl").json()["premium"] is False
    assert policy.permission("carl", "bob") == {**ALLOWED, "callee": "bob"}
    assert policy.permission("carl", "dora")["reason"] == "no_prior_dm"


async def test_a_report_publishes_call_reported_once_and_blocks_the_reported_user(
    policy: Policy, rig: PolicyRig
) -> None:
    received: list[CallReported] = []

    async def on_reported(event: CallReported, delivery: Delivery) -> None:
        received.append(event)

    bus = await rig.bus("trust-and-safety", reports={CallReported: on_reported})
    await asyncio.to_thread(policy.callable_pair, "bob", "alice")
    assert (await asyncio.to_thread(policy.permission, "bob", "alice"))["allowed"] is True
    # two calls bob -> alice that policy judged (F7: only real calls can be reported)
    call_1 = await rig.judged_call(bus, "bob", "alice")
    call_2 = await rig.judged_call(bus, "bob", "alice")
    alice = policy.as_user("alice")
    body = {"call_id": call_1, "reported_user": "bob", "reason": "harassment"}
    first = await asyncio.to_thread(policy.post, "/v1/reports", alice, json=body)
    assert first.status_code == 201, first.text
    assert first.json()["reporter"] == "alice" and first.json()["blocked"] is True
    again = await asyncio.to_thread(policy.post, "/v1/reports", alice, json=body)
    assert again.status_code == 200
    assert again.json() == first.json()

    await eventually(lambda: received)
    # a report of another call is a second event; it makes the count below meaningful
    other = {**body, "call_id": call_2, "reason": "spam"}
    assert (
        await asyncio.to_thread(policy.post, "/v1/reports", alice, json=other)
    ).status_code == 201
    await eventually(lambda: len(received) >= 2)
    assert [(e.call_id, e.reporter, e.reported_user, e.reason.value) for e in received] == [
        (call_1, "alice", "bob", "harassment"),
        (call_2, "alice", "bob", "spam"),
    ]
    assert (await asyncio.to_thread(policy.permission, "bob", "alice")) == unavailable("alice")
    assert policy.get("/v1/blocks", alice).json() == {"blocked": ["bob"]}

    for bad in (
        {**body, "reported_user": "alice"},
        {**body, "reason": "rude"},
        {**body, "call_id": "x" * 65},
        {"call_id": call_2, "reported_user": "bob"},
    ):
        response = await asyncio.to_thread(policy.post, "/v1/reports", alice, json=bad)
        assert response.status_code == 422, (bad, response.text)


def test_the_demo_seed_shows_every_rule_and_can_run_twice(
    seeded_policy: ServiceProcess, token: Token
) -> None:
    from tools import seed

    policy = Policy(seeded_policy, token)
    for caller, callee, allowed, reason, why in seed.EXPECTED:
        got = policy.permission(caller, callee)
        assert (got["allowed"], got["reason"]) == (allowed, reason), (caller, callee, why)
    assert policy.get("/v1/settings", policy.as_user("dave")).json()["enabled"] is False


def test_a_browsers_and_an_apps_permission_query_answer_alike(policy: Policy) -> None:
    policy.callable_pair("alice", "bob")
    alice = policy.as_user("alice")
    for callee in ("bob", "carol", "alice"):
        app = policy.get(f"/v1/permissions/{callee}", alice)
        # a browser's request (Origin) gets the CORS headers too
        browser = policy.get(
            f"/v1/permissions/{callee}", {**alice, "Origin": "http://localhost:8001"}
        )
        assert app.status_code == browser.status_code == 200
        assert app.json() == browser.json()
        assert app.headers["content-type"] == browser.headers["content-type"]
        assert browser.headers["content-type"] == "application/json"
        assert browser.headers["access-control-allow-origin"] == "*"
    assert policy.get("/v1/permissions/bob", alice).json() == ALLOWED
    # both are counted under the route's metrics
    metrics = policy.get("/metrics", {}).text
    line = next(
        m
        for m in metrics.splitlines()
        if m.startswith("dmcall_http_requests_total{")
        and 'route="/v1/permissions/{callee}"' in m
        and 'status="200"' in m
    )
    assert float(line.rsplit(" ", 1)[1]) >= 7


def test_queries_are_a_json_503_while_redis_is_down(
    spawn: Callable[..., ServiceProcess], token: Token, private_redis: PrivateRedis
) -> None:
    policy = Policy(spawn("policy", REDIS_URL=private_redis.url), token)
    assert policy.permission("alice", "bob")["reason"] == "caller_not_premium"
    private_redis.stop()
    alice = policy.as_user("alice")
    for path, headers in (
        ("/v1/permissions/bob", alice),
        ("/v1/permissions/bob", {**alice, "Origin": "http://localhost:8001"}),  # a browser's
        ("/v1/settings", alice),
        ("/v1/platform/users/alice", policy.platform),
    ):
        down = policy.get(path, headers)
        assert down.status_code == 503, (path, down.text)
        assert down.json()["error"] == "unavailable"
    private_redis.start()
    assert policy.permission("alice", "bob")["reason"] == "caller_not_premium"
