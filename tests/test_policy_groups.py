"""Group calls in policy against the real servers: group facts over HTTP and as events
(reordered, duplicated), the group permission query (one Redis round trip), the token
user's groups, the support decision, and exactly one verdict per group call_requested."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from services.policy.domain import CallSettings
from services.policy.settings import PolicySettings
from services.policy.store import PolicyStore, Relation
from shared import redis as shared_redis
from shared.bus import Delivery
from shared.contracts import (
    CallAuthorized,
    CallParticipantJoined,
    CallRejected,
    CallRequested,
    Event,
    GroupMemberAdded,
    GroupMemberRemoved,
    GroupMessageSent,
    MediaKind,
    parse_event,
)
from tests.conftest import auth
from tests.support.policy import PolicyRig, Token, verdicts_in
from tests.support.redis_server import PrivateRedis
from tests.support.signaling import EventTap
from tests.support.waiting import eventually
from tools.stack import ServiceProcess

pytestmark = pytest.mark.e2e

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> dict[str, str]:
    return {"occurred_at": (T0 + timedelta(seconds=seconds)).isoformat()}


class Policy:
    def __init__(self, proc: ServiceProcess, token: Token) -> None:
        self.http = httpx.Client(
            base_url=proc.url, headers=auth(token("platform-svc", scope="platform"))
        )
        self.token = token

    def user(self, name: str) -> dict[str, str]:
        return auth(self.token(name))

    def ok(self, method: str, path: str, **kw: Any) -> Any:
        response = self.http.request(method, path, **kw)
        assert response.is_success, (method, path, response.status_code, response.text)
        return response.json()

    def permission(self, group: str, user: str) -> httpx.Response:
        return self.http.get(f"/v1/permissions/groups/{group}", headers=self.user(user))

    def would_ring(self, group: str, user: str) -> list[str]:
        response = self.permission(group, user)
        assert response.status_code == 200, response.text
        return list(response.json()["would_ring"])


@pytest.fixture
def policy(spawn: Callable[..., ServiceProcess], token: Token) -> Policy:
    return Policy(spawn("policy"), token)


def test_group_facts_over_http_are_order_safe_and_drive_the_group_permission(
    policy: Policy,
) -> None:
    members = "/v1/platform/groups/g1/members"
    # bob: removed (t+2) before his add (t+1) arrives; then the add again: not a member
    gone = policy.ok("DELETE", f"{members}/bob", params=at(2))
    assert gone == {"group_id": "g1", "user_id": "bob", "member": False, "applied": True}
    late = policy.ok("PUT", f"{members}/bob", params=at(1))
    assert (late["member"], late["applied"]) == (False, False)
    assert policy.ok("PUT", f"{members}/bob", params=at(1))["applied"] is False
    # same instant: the removal wins whichever arrives first
    assert policy.ok("PUT", f"{members}/carol", params=at(5))["member"] is True
    assert policy.ok("DELETE", f"{members}/carol", params=at(5))["member"] is False
    assert policy.ok("PUT", f"{members}/carol", params=at(5))["member"] is False
    for user in ("alice", "erin", "frank", "dave"):
        assert policy.ok("PUT", f"{members}/{user}", params=at(1))["member"] is True
    assert policy.ok("PUT", f"{members}/alice", params=at(1))["applied"] is False  # duplicate
    # a newer add takes: bob is back
    assert policy.ok("PUT", f"{members}/bob", params=at(3))["member"] is True
    # posts: bob, erin, dave, a non-member (kept: the fact may precede the membership)
    for sender in ("bob", "erin", "erin", "dave", "zed"):
        policy.ok("POST", "/v1/platform/groups/g1/messages", json={"sender": sender})
    first = policy.ok("POST", "/v1/platform/groups/g1/messages", json={"sender": "alice"})
    assert first == {"group_id": "g1", "sender": "alice", "first": True}
    again = policy.ok("POST", "/v1/platform/groups/g1/messages", json={"sender": "alice", **at(9)})
    assert again["first"] is False
    assert policy.ok("GET", "/v1/platform/groups/g1") == {
        "group_id": "g1",
        "members": ["alice", "bob", "dave", "erin", "frank"],
        "posted": ["alice", "bob", "dave", "erin", "zed"],
    }

    policy.ok("PUT", "/v1/platform/users/alice", json={"premium": True, "verified": False})
    policy.ok("PUT", "/v1/settings", headers=policy.user("dave"), json={"enabled": False})
    permission = policy.permission("g1", "alice").json()
    # frank never posted, dave has calls off: the starter sees only who would ring
    assert permission == {
        "group": "g1",
        "allowed": True,
        "media": ["audio", "video"],
        "reason": None,
        "would_ring": ["bob", "erin"],
    }
    decision = policy.ok("GET", "/v1/platform/decisions/groups/g1/alice")
    assert decision["ring"] == ["bob", "erin"]
    assert decision["not_rung"] == [
        {"user": "dave", "why": "calls_disabled"},
        {"user": "frank", "why": "no_group_post"},
    ]
    # erin turns allow_from.groups off; she does not follow alice: no longer rung
    no_groups = {"allow_from": {"groups": False}}
    saved = policy.ok("PUT", "/v1/settings", headers=policy.user("erin"), json=no_groups)
    assert saved["allow_from"] == {
        "address_book": True,
        "following": True,
        "verified": False,
        "groups": False,
    }
    assert policy.ok("GET", "/v1/settings", headers=policy.user("erin")) == saved
    assert policy.would_ring("g1", "alice") == ["bob"]
    policy.ok("PUT", "/v1/platform/users/erin/following/alice")
    assert policy.would_ring("g1", "alice") == ["bob", "erin"]
    # blocks both ways, platform and call blocks
    policy.ok("PUT", "/v1/platform/users/bob/blocks/alice")
    policy.ok("PUT", "/v1/blocks/erin", headers=policy.user("alice"))
    assert policy.would_ring("g1", "alice") == []
    why = {
        n["user"]: n["why"]
        for n in policy.ok("GET", "/v1/platform/decisions/groups/g1/alice")["not_rung"]
    }
    assert (why["bob"], why["erin"]) == ("callee_blocked_caller", "caller_blocked_callee")
    policy.ok("DELETE", "/v1/platform/users/bob/blocks/alice")
    policy.ok("DELETE", "/v1/blocks/erin", headers=policy.user("alice"))
    assert policy.would_ring("g1", "alice") == ["bob", "erin"]

    # bob is not premium: caller-safe reason about himself; nobody would ring
    assert policy.permission("g1", "bob").json() == {
        "group": "g1",
        "allowed": False,
        "media": [],
        "reason": "caller_not_premium",
        "would_ring": [],
    }
    # a non-member and an unknown group alike: 404, no membership oracle
    for user, group in (("carol", "g1"), ("alice", "nope")):
        response = policy.permission(group, user)
        assert response.status_code == 404, response.text
        assert response.json()["error"] == "not_found"
    assert policy.permission("g.1", "alice").status_code == 422

    # GET /v1/groups: the token user's groups with their members
    policy.ok("PUT", "/v1/platform/groups/g2/members/alice")
    policy.ok("PUT", "/v1/platform/groups/g2/members/carol")
    assert policy.ok("GET", "/v1/groups", headers=policy.user("alice")) == [
        {"group": "g1", "members": ["alice", "bob", "dave", "erin", "frank"]},
        {"group": "g2", "members": ["alice", "carol"]},
    ]
    assert policy.ok("GET", "/v1/groups", headers=policy.user("carol")) == [
        {"group": "g2", "members": ["alice", "carol"]}
    ]
    assert policy.ok("GET", "/v1/groups", headers=policy.user("nobody")) == []
    # the platform routes take only the platform; bad input is a 422
    alice = policy.user("alice")
    for method, path in (
        ("PUT", f"{members}/bob"),
        ("DELETE", f"{members}/bob"),
        ("GET", "/v1/platform/groups/g1"),
        ("GET", "/v1/platform/decisions/groups/g1/alice"),
    ):
        assert policy.http.request(method, path, headers=alice).status_code == 403
    message = "/v1/platform/groups/g1/messages"
    assert policy.http.post(message, headers=alice, json={"sender": "alice"}).status_code == 403
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    for body in (
        {},
        {"sender": "a b"},
        {"sender": "bob", "extra": 1},
        {"sender": "bob", "occurred_at": future},
    ):
        assert policy.http.post(message, json=body).status_code == 422, body
    assert policy.http.put(f"{members}/b%20b").status_code == 422
    assert policy.http.put(f"{members}/bob", params={"occurred_at": future}).status_code == 422


async def test_group_facts_as_events_reordered_and_duplicated_end_in_the_newest_state(
    rig: PolicyRig,
) -> None:
    proc = rig.spawn("policy")
    platform = await rig.bus("platform")
    added = GroupMemberAdded(group_id="g", user_id="bob", occurred_at=T0 + timedelta(seconds=1))
    events: list[Event] = [
        GroupMemberRemoved(group_id="g", user_id="bob", occurred_at=T0 + timedelta(seconds=2)),
        added,
        added,  # the same message twice
        GroupMemberAdded(group_id="g", user_id="bob", occurred_at=T0 + timedelta(seconds=1)),
        GroupMemberAdded(group_id="g", user_id="alice", occurred_at=T0),
        GroupMemberAdded(group_id="g", user_id="erin", occurred_at=T0 + timedelta(seconds=4)),
        GroupMemberRemoved(group_id="g", user_id="erin", occurred_at=T0 + timedelta(seconds=3)),
        GroupMessageSent(group_id="g", sender="erin"),
        GroupMessageSent(group_id="g", sender="erin"),
        GroupMessageSent(group_id="g", sender="bob"),
    ]
    for event in events:
        await platform.publish(event)
        await rig.handled("facts", event)
    async with httpx.AsyncClient(base_url=proc.url) as http:
        platform_headers = auth(rig.token("platform-svc", scope="platform"))
        group = (await http.get("/v1/platform/groups/g", headers=platform_headers)).json()
        assert group == {"group_id": "g", "members": ["alice", "erin"], "posted": ["bob", "erin"]}
        metrics = (await http.get("/metrics")).text
        for event_type, count in (("group.member_added", 2), ("group.member_removed", 1)):
            line = f'dmcall_policy_stale_facts_total{{event_type="{event_type}"}} {count}.0'
            assert line in metrics
        # signaling reads the same directory
        assert await rig.redis.smembers(rig.key("groups", "of", "erin")) == {b"g"}


async def test_a_group_call_requested_gets_exactly_one_verdict_naming_whom_to_ring(
    rig: PolicyRig, tap: EventTap
) -> None:
    proc = rig.spawn("policy", GROUP_CALL_MAX_PARTICIPANTS="3")
    policy = Policy(proc, rig.token)
    for user in ("alice", "bob", "carol", "dave", "erin", "frank"):
        policy.ok("PUT", f"/v1/platform/groups/six/members/{user}")
    for user in ("alice", "bob", "carol", "dave", "erin"):  # frank never posted
        policy.ok("POST", "/v1/platform/groups/six/messages", json={"sender": user})
    policy.ok("PUT", "/v1/platform/users/alice", json={"premium": True, "verified": False})
    policy.ok("PUT", "/v1/settings", headers=policy.user("carol"), json={"enabled": False})

    verdicts: list[Event] = []

    async def on_verdict(event: CallAuthorized | CallRejected, delivery: Delivery) -> None:
        verdicts.append(event)

    await rig.bus("signaling-test", verdicts={CallAuthorized: on_verdict, CallRejected: on_verdict})
    signaling = await rig.bus("signaling-publisher")

    def placed(caller: str, call_id: str, invitees: list[str]) -> CallRequested:
        return CallRequested(
            call_id=call_id, caller=caller, group="six", invitees=invitees, media=MediaKind.VIDEO
        )

    others = ["bob", "carol", "dave", "erin", "frank"]
    call = placed("alice", "gc-1", others)
    await signaling.publish(call)
    await signaling.publish(call)  # delivered twice
    await rig.handled("verdicts", call)
    retry = placed("alice", "gc-1", others)  # signaling retried under a new event id
    await signaling.publish(retry)
    free = placed("bob", "gc-2", ["alice", "carol", "dave", "erin", "frank"])  # not premium
    outsider = placed("zed", "gc-3", others)  # not a member (removed since placement)
    for event in (free, outsider):
        await signaling.publish(event)
    await rig.handled("verdicts", retry, free, outsider)
    await eventually(lambda: len(verdicts_in(tap)) >= 3)
    await tap.settle(signaling.publish)  # a duplicate verdict would be on the tap by now

    published = sorted((parse_event(m) for m in verdicts_in(tap)), key=lambda e: e.call_id)  # type: ignore[attr-defined]
    assert [e.call_id for e in published] == ["gc-1", "gc-2", "gc-3"]  # type: ignore[attr-defined]
    authorized, rejected, not_member = published
    assert isinstance(authorized, CallAuthorized)
    assert (authorized.caller, authorized.group, authorized.callee) == ("alice", "six", None)
    assert authorized.media is MediaKind.VIDEO
    # carol calls off, frank never posted; GROUP_CALL_MAX_PARTICIPANTS=3 rings two of the
    # three eligible, the first in the listed order
    assert authorized.ring == ["bob", "dave"]
    assert isinstance(rejected, CallRejected) and rejected.group == "six"
    assert (rejected.reason.value, rejected.detail and rejected.detail.value) == (
        "caller_not_premium",
        "caller_not_premium",
    )
    assert isinstance(not_member, CallRejected)
    assert not_member.detail is not None and not_member.detail.value == "not_a_member"
    await eventually(lambda: len(verdicts) >= 3)
    assert sorted(v.call_id for v in verdicts) == ["gc-1", "gc-2", "gc-3"]  # type: ignore[attr-defined]

    # reports: the starter and rung invitees are parties; a member who joins becomes one
    async with httpx.AsyncClient(base_url=proc.url) as http:

        async def report(reporter: str, reported: str) -> int:
            body = {"call_id": "gc-1", "reported_user": reported, "reason": "spam"}
            response = await http.post("/v1/reports", headers=policy.user(reporter), json=body)
            return response.status_code

        assert await report("erin", "alice") == 404  # not rung, not joined: no call of hers
        assert await report("bob", "erin") == 403  # erin is no party (yet)
        joined = CallParticipantJoined(call_id="gc-1", user="erin", group="six")
        await signaling.publish(joined)
        await rig.handled("verdicts", joined)
        assert await report("erin", "alice") == 201
        assert await report("dave", "bob") == 201
        assert (await http.get("/v1/blocks", headers=policy.user("erin"))).json() == {
            "blocked": ["alice"]
        }
    # erin's report blocks alice from ringing her in the group too
    assert "erin" not in policy.ok("GET", "/v1/platform/decisions/groups/six/alice")["ring"]


@pytest.fixture
async def private_store(
    private_redis: PrivateRedis, make_settings: Callable[..., PolicySettings]
) -> AsyncIterator[tuple[PolicyStore, str]]:
    settings = make_settings(PolicySettings, redis_url=private_redis.url)
    redis = shared_redis.connect(settings, name="test-policy-groups")
    store = PolicyStore(redis, settings)
    yield store, private_redis.url
    await redis.aclose()


async def test_the_group_query_reads_a_group_of_16_in_one_round_trip(
    private_store: tuple[PolicyStore, str],
) -> None:
    store, url = private_store
    now = datetime.now(UTC)
    users = [f"u{i:02}" for i in range(16)]
    for i, user in enumerate(users):
        await store.set_group_member("big", user, present=True, at=now)
        if i % 4:
            await store.record_group_post("big", user)
    await store.update_user("u00", premium=True, verified=True, at=now)
    await store.put_settings("u05", CallSettings(enabled=False))
    await store.put_settings("u06", CallSettings(allow_groups=False, allow_verified=True))
    await store.put_settings("u07", CallSettings(allow_groups=False))
    await store.set_relation(Relation.BLOCKS, "u09", "u00", present=True, at=now)
    await store.block_calls("u00", "u10")
    await store.set_relation(Relation.CONTACTS, "u11", "u00", present=True, at=now)
    await store.set_relation(Relation.FOLLOWING, "u13", "u00", present=True, at=now)
    await store.group_facts("big", "u00")  # loads the script

    admin = Redis.from_url(url)
    await admin.config_resetstat()
    facts = await store.group_facts("big", "u00")
    stats = await admin.info("commandstats")
    await admin.aclose()
    ran = {
        name.removeprefix("cmdstat_"): value["calls"]
        for name, value in stats.items()
        if name not in ("cmdstat_config|resetstat", "cmdstat_config", "cmdstat_info")
    }
    # one EVALSHA; every read inside it (Redis counts a script's own calls too, so the
    # reads show up beside it, but no other command came from the client)
    assert ran.pop("evalsha") == 1
    assert set(ran) <= {"hmget", "sismember", "smembers"}, ran
    assert facts.starter_member and facts.starter_premium and facts.starter_verified
    by_user = {m.user: m for m in facts.invitees}
    assert sorted(by_user) == users[1:]
    assert [u for u, m in by_user.items() if m.posted] == [
        u for i, u in enumerate(users) if i % 4 and i
    ]
    assert by_user["u05"].settings.enabled is False
    assert (by_user["u06"].settings.allow_groups, by_user["u06"].settings.allow_verified) == (
        False,
        True,
    )
    assert by_user["u09"].blocked_starter and by_user["u10"].starter_blocked
    assert by_user["u11"].starter_in_contacts and by_user["u13"].follows_starter
    assert not by_user["u02"].blocked_starter and by_user["u02"].settings == CallSettings()
    # a listed invitee who is no member is judged as such
    listed = await store.group_facts("big", "u00", ["u01", "stranger"])
    assert [(m.user, m.member) for m in listed.invitees] == [("u01", True), ("stranger", False)]
    outsider = await store.group_facts("big", "stranger")
    assert not outsider.starter_member


def test_the_demo_seed_makes_a_group_to_try_group_calls_in(
    seeded_policy: ServiceProcess, token: Token
) -> None:
    from tools import seed

    policy = Policy(seeded_policy, token)
    group = policy.ok("GET", f"/v1/platform/groups/{seed.GROUP}")
    assert group["members"] == sorted(seed.GROUP_MEMBERS)
    assert group["posted"] == sorted(seed.GROUP_POSTERS)
    for starter, reason, ring, why in seed.GROUP_EXPECTED:
        got = policy.permission(seed.GROUP, starter).json()
        assert (got["reason"], got["would_ring"]) == (reason, ring), (starter, why)
    assert {"group": seed.GROUP, "members": sorted(seed.GROUP_MEMBERS)} in policy.ok(
        "GET", "/v1/groups", headers=policy.user("frank")
    )
