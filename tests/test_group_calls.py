"""Group calls end to end: real policy, notifications and two signaling processes, real
RabbitMQ and Redis, devices on real WebSockets, the events read off the broker.

A group of six: alice starts; bob, carol and erin are rung; dave (calls off) and frank
(never posted in the group) are not, and alice never learns why. Then the whole life of
a group call, and a second call whose unanswered invitees are missed exactly once each
although the signaling instance holding their sockets is SIGKILLed while it rings.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from shared.auth import verify_media_token
from shared.contracts import CallRequested, EventType, parse_event
from shared.media_registry import MediaNode, MediaRegistry
from shared.settings import CommonSettings
from tests.conftest import Infra, auth
from tests.support.signaling import SIGNALING_EVENTS, Device, EventTap, event_tap
from tests.support.waiting import eventually
from tools.stack import ServiceProcess

pytestmark = pytest.mark.e2e

NODE = MediaNode(node_id="media-group-1", url="http://127.0.0.1:9/", capacity=50, load=0)
GROUP = "g-friends"
MEMBERS = ("alice", "bob", "carol", "dave", "erin", "frank")
RUNG = {"bob", "carol", "erin"}
EVENTS = (
    *SIGNALING_EVENTS,
    EventType.CALL_AUTHORIZED,
    EventType.CALL_PARTICIPANT_JOINED,
    EventType.CALL_PARTICIPANT_LEFT,
)


class Group:
    def __init__(
        self,
        procs: dict[str, Any],
        tap: EventTap,
        token: Callable[..., str],
    ) -> None:
        self.policy: ServiceProcess = procs["policy"]
        self.notifications: ServiceProcess = procs["notifications"]
        self.signaling: list[ServiceProcess] = procs["signaling"]
        self.tap = tap
        self.token = token
        self.devices: list[Device] = []
        self.clients: list[httpx.AsyncClient] = []

    def h(self, user: str) -> dict[str, str]:
        return auth(self.token(user))

    def http(self, instance: int = 0) -> httpx.AsyncClient:
        client = httpx.AsyncClient(base_url=self.signaling[instance].url, timeout=15)
        self.clients.append(client)
        return client

    async def device(self, user: str, device_id: str, instance: int) -> Device:
        device = await Device.connect(
            self.signaling[instance].url, self.token(user), user, device_id
        )
        self.devices.append(device)
        return device

    async def platform(self, method: str, path: str, body: Any = None) -> None:
        headers = auth(self.token("platform-svc", scope="platform"))
        async with httpx.AsyncClient(base_url=self.policy.url, timeout=15) as policy:
            response = await policy.request(method, path, json=body, headers=headers)
            assert response.status_code < 300, (path, response.status_code, response.text)

    async def as_user(self, user: str, method: str, path: str, body: Any = None) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.policy.url, timeout=15) as policy:
            return await policy.request(method, path, json=body, headers=self.h(user))

    async def inbox(self, user: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=self.notifications.url, timeout=15) as client:
            response = await client.get("/v1/notifications?limit=500", headers=self.h(user))
            assert response.status_code == 200, response.text
            return list(response.json())

    def events(self, event_type: EventType, call_id: str) -> list[dict[str, Any]]:
        return self.tap.of(event_type, call_id)


@pytest.fixture
async def group(
    spawn: Callable[..., ServiceProcess],
    token: Callable[..., str],
    settings: CommonSettings,
    infra: Infra,
    namespace: str,
    redis_client: Redis,
) -> AsyncIterator[Group]:
    env = {"RING_TIMEOUT_S": "4", "POLICY_REQUIRE_PREMIUM": "true"}
    procs: dict[str, Any] = {
        "policy": spawn("policy", wait=False, **env),
        "notifications": spawn("notifications", wait=False, **env),
        "signaling": [spawn("signaling", wait=False, **env) for _ in range(2)],
    }
    for proc in (procs["policy"], procs["notifications"], *procs["signaling"]):
        proc.wait_ready()
    await MediaRegistry(redis_client, settings).heartbeat(NODE, ttl_s=600)
    async with event_tap(infra.rabbitmq_url, namespace, EVENTS) as tap:
        g = Group(procs, tap, token)
        await g.platform("PUT", "/v1/platform/users/alice", {"premium": True, "verified": False})
        for member in MEMBERS:
            await g.platform("PUT", f"/v1/platform/groups/{GROUP}/members/{member}")
            if member != "frank":  # frank never posted in the group
                await g.platform(
                    "POST", f"/v1/platform/groups/{GROUP}/messages", {"sender": member}
                )
        calls_off = await g.as_user("dave", "PUT", "/v1/settings", {"enabled": False})
        assert calls_off.status_code == 200, calls_off.text
        try:
            yield g
        finally:
            for device in g.devices:
                await device.close()
            for client in g.clients:
                await client.aclose()


def states(call: dict[str, Any]) -> dict[str, str]:
    return {p["user"]: p["state"] for p in call["participants"]}


async def test_a_group_call_from_ringing_to_its_last_participant(
    group: Group, settings: CommonSettings
) -> None:
    g = group
    # The phone icon of the conversation: who would ring, never why the others would not.
    icon = await g.as_user("alice", "GET", f"/v1/permissions/groups/{GROUP}")
    assert icon.status_code == 200, icon.text
    assert icon.json()["allowed"] is True and set(icon.json()["would_ring"]) == RUNG

    a1 = await g.device("alice", "a1", 0)
    b1, b2 = await g.device("bob", "b1", 0), await g.device("bob", "b2", 1)
    c1 = await g.device("carol", "c1", 1)
    e1 = await g.device("erin", "e1", 0)
    d1, f1 = await g.device("dave", "d1", 1), await g.device("frank", "f1", 0)
    on0, on1 = g.http(0), g.http(1)

    placed = await on0.post(
        "/v1/calls",
        json={"group": GROUP, "media": "video", "device_id": "a1"},
        headers=g.h("alice"),
    )
    assert placed.status_code == 202, placed.text
    assert placed.json()["state"] == "requested"
    call_id = str(placed.json()["call_id"])

    # Every device of every rung member rings, each with the group named.
    for device in (b1, b2, c1, e1):
        incoming = await device.expect(type="call.incoming", call_id=call_id)
        assert (incoming["group"], incoming["caller"], incoming["media"]) == (
            GROUP,
            "alice",
            "video",
        )
    ringing = await a1.expect(type="call.state", call_id=call_id, state="ringing")
    assert ringing["group"] == GROUP and ringing["callee"] is None
    assert {u for u, s in states(ringing).items() if s == "ringing"} == RUNG
    assert states(ringing)["alice"] == "joined"
    assert {states(ringing)["dave"], states(ringing)["frank"]} == {"not_rung"}
    requested = parse_event(g.events(EventType.CALL_REQUESTED, call_id)[0])
    assert isinstance(requested, CallRequested)
    assert set(requested.invitees) == set(MEMBERS) - {"alice"}
    await eventually(lambda: len(g.events(EventType.CALL_RINGING, call_id)) == 3)
    assert {e["callee"] for e in g.events(EventType.CALL_RINGING, call_id)} == RUNG
    # The incoming-call notifications name the group; nothing reaches dave or frank.
    for member in RUNG:
        items = await notified(g, member, call_id, "incoming_call")
        assert items[0]["group"] == GROUP

    # bob answers on b1: b2 stops ringing; alice gets her media grant.
    accepted = await on1.post(
        f"/v1/calls/{call_id}/accept", json={"device_id": "b1"}, headers=g.h("bob")
    )
    assert accepted.status_code == 200, accepted.text
    grant = verify_media_token(settings, accepted.json()["media_token"])
    assert (grant.call_id, grant.user_id, grant.group) == (call_id, "bob", GROUP)
    elsewhere = await b2.expect(type="call.state", call_id=call_id, state="accepted")
    assert elsewhere["answered_elsewhere"] is True and "media_token" not in elsewhere
    to_alice = await a1.expect(type="call.state", call_id=call_id, state="accepted")
    assert verify_media_token(settings, to_alice["media_token"]).user_id == "alice"

    # carol answers; erin declines (the call goes on); frank, never rung, joins.
    ok = await on0.post(
        f"/v1/calls/{call_id}/accept", json={"device_id": "c1"}, headers=g.h("carol")
    )
    assert ok.status_code == 200, ok.text
    declined = await on1.post(f"/v1/calls/{call_id}/decline", headers=g.h("erin"))
    assert declined.status_code == 200, declined.text
    assert declined.json()["state"] in ("accepted", "active")
    assert states(declined.json())["erin"] == "declined"
    joined = await on1.post(
        f"/v1/calls/{call_id}/join", json={"device_id": "f1"}, headers=g.h("frank")
    )
    assert joined.status_code == 200, joined.text
    assert verify_media_token(settings, joined.json()["media_token"]).user_id == "frank"
    seen = await a1.expect(type="call.participant", call_id=call_id, user="frank")
    assert seen["state"] == "joined"
    await b1.expect(type="call.participant", call_id=call_id, user="frank", state="joined")

    # The group's ongoing call, for any member (the phone icon turns into "Join").
    live = await on0.get(f"/v1/groups/{GROUP}/call", headers=g.h("dave"))
    assert live.status_code == 200 and live.json()["call_id"] == call_id
    outsider = await on0.get(f"/v1/groups/{GROUP}/call", headers=g.h("mallory"))
    assert outsider.status_code == 404
    not_member = await on0.post(
        f"/v1/calls/{call_id}/join", json={"device_id": "m1"}, headers=g.h("mallory")
    )
    assert not_member.status_code == 404

    # Pairwise signals (the E2EE key exchange) go to the one participant named.
    await a1.send({"type": "call.signal", "call_id": call_id, "to": "frank", "payload": {"k": 1}})
    relayed = await f1.expect(type="call.signal", call_id=call_id)
    assert (relayed["from"], relayed["payload"]) == ("alice", {"k": 1})

    # Participants leave one by one; the one who declined rejoins while the call lasts.
    for user in ("alice", "bob"):
        left = await on0.post(f"/v1/calls/{call_id}/hangup", headers=g.h(user))
        assert left.status_code == 200, left.text
        assert states(left.json())[user] == "left" and left.json()["state"] != "ended"
    back = await on0.post(
        f"/v1/calls/{call_id}/join", json={"device_id": "e1"}, headers=g.h("erin")
    )
    assert back.status_code == 200, back.text
    for user in ("carol", "frank"):
        left = await on1.post(f"/v1/calls/{call_id}/hangup", headers=g.h(user))
        assert left.status_code == 200 and left.json()["state"] != "ended", left.text
    last = await on1.post(f"/v1/calls/{call_id}/hangup", headers=g.h("erin"))
    assert last.status_code == 200, last.text
    assert (last.json()["state"], last.json()["end_reason"]) == ("ended", "user_hangup")
    assert set(states(last.json()).values()) <= {"left", "not_rung"}
    again = await on0.post(
        f"/v1/calls/{call_id}/join", json={"device_id": "d1"}, headers=g.h("dave")
    )
    assert again.status_code == 409 and again.json()["state"] == "ended"
    assert (await on0.get(f"/v1/groups/{GROUP}/call", headers=g.h("dave"))).status_code == 404

    # The events, each once: who joined (erin twice) and left; the end with the last.
    await eventually(lambda: g.events(EventType.CALL_ENDED, call_id))
    joins = sorted(e["user"] for e in g.events(EventType.CALL_PARTICIPANT_JOINED, call_id))
    assert joins == ["bob", "carol", "erin", "frank"]
    assert len(g.events(EventType.CALL_DECLINED, call_id)) == 1
    assert g.events(EventType.CALL_MISSED, call_id) == []
    ended = g.events(EventType.CALL_ENDED, call_id)
    assert len(ended) == 1 and ended[0]["group"] == GROUP and ended[0]["callee"] is None

    # History per participant; dave and frank were never rung: frank joined, dave did not.
    history = await on0.get("/v1/calls", headers=g.h("frank"))
    assert [c["call_id"] for c in history.json()["calls"]][:1] == [call_id]
    dave_history = await on0.get("/v1/calls", headers=g.h("dave"))
    assert call_id not in [c["call_id"] for c in dave_history.json()["calls"]]
    assert d1.matching(type="call.incoming") == [] and f1.matching(type="call.incoming") == []
    for member in ("dave", "frank"):
        assert _of(await g.inbox(member), call_id, "incoming_call") == []


async def test_unanswered_invitees_are_missed_once_each_across_a_sigkilled_instance(
    group: Group,
) -> None:
    g = group
    a1 = await g.device("alice", "a1", 0)
    b1 = await g.device("bob", "b1", 0)
    c1 = await g.device("carol", "c1", 1)
    e1 = await g.device("erin", "e1", 1)
    on0 = g.http(0)
    placed = await on0.post(
        "/v1/calls",
        json={"group": GROUP, "media": "audio", "device_id": "a1"},
        headers=g.h("alice"),
    )
    assert placed.status_code == 202, placed.text
    call_id = str(placed.json()["call_id"])
    for device in (b1, c1, e1):
        await device.expect(type="call.incoming", call_id=call_id)
    ok = await on0.post(f"/v1/calls/{call_id}/accept", json={"device_id": "b1"}, headers=g.h("bob"))
    assert ok.status_code == 200, ok.text

    # carol's and erin's instance dies while their phones ring; the survivor's timer
    # misses each of them once at the deadline, and the call goes on for alice and bob.
    g.signaling[1].kill()
    missed = await a1.expect(
        timeout=20, type="call.participant", call_id=call_id, user="carol", state="missed"
    )
    assert missed["call_id"] == call_id
    await eventually(lambda: len(g.events(EventType.CALL_MISSED, call_id)) >= 2)
    for member in ("carol", "erin"):
        items = await notified(g, member, call_id, "missed_call")
        assert items[0]["group"] == GROUP and items[0]["from"] == "alice"
    call = (await on0.get(f"/v1/calls/{call_id}", headers=g.h("alice"))).json()
    assert states(call) | {"dave": "-", "frank": "-"} == {
        "alice": "joined",
        "bob": "joined",
        "carol": "missed",
        "erin": "missed",
        "dave": "-",
        "frank": "-",
    }
    assert call["state"] in ("accepted", "active")
    # A later event proves nothing more came: the call's end, after which we count.
    await on0.post(f"/v1/calls/{call_id}/hangup", headers=g.h("alice"))
    done = await on0.post(f"/v1/calls/{call_id}/hangup", headers=g.h("bob"))
    assert done.json()["state"] == "ended", done.text
    await eventually(lambda: g.events(EventType.CALL_ENDED, call_id))
    assert sorted(e["callee"] for e in g.events(EventType.CALL_MISSED, call_id)) == [
        "carol",
        "erin",
    ]
    for member in ("carol", "erin"):
        assert len(_of(await g.inbox(member), call_id, "missed_call")) == 1
    assert _of(await g.inbox("bob"), call_id, "missed_call") == []


def _of(items: list[dict[str, Any]], call_id: str, kind: str) -> list[dict[str, Any]]:
    return [n for n in items if n.get("call_id") == call_id and n.get("kind") == kind]


async def notified(g: Group, user: str, call_id: str, kind: str) -> list[dict[str, Any]]:
    """``user``'s notifications of ``kind`` about the call, once there is one."""

    async def check() -> list[dict[str, Any]]:
        return _of(await g.inbox(user), call_id, kind)

    return list(await eventually(check))
