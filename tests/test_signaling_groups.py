"""Group calls in signaling: real signaling processes, RabbitMQ and Redis; devices on real
WebSockets; events read off the broker as published. Policy's verdict is published by
the test (``call_authorized`` with ``ring``), membership written into the directory policy
writes (shared/groups.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from shared.auth import verify_media_token
from shared.contracts import (
    CallAuthorized,
    CallMediaConnected,
    EventType,
    MediaKind,
    parse_event,
)
from shared.groups import GroupDirectory
from shared.media_registry import MediaNode, MediaRegistry
from shared.settings import CommonSettings
from tests.conftest import Infra, auth
from tests.support.signaling import Device, EventTap, event_tap, publish_event
from tests.support.waiting import eventually
from tools.stack import ServiceProcess

NODE = MediaNode(node_id="media-group-1", url="http://127.0.0.1:9/", capacity=50, load=0)
GROUP_EVENTS = (
    EventType.CALL_REQUESTED,
    EventType.CALL_RINGING,
    EventType.CALL_ACCEPTED,
    EventType.CALL_DECLINED,
    EventType.CALL_CANCELLED,
    EventType.CALL_MISSED,
    EventType.CALL_ENDED,
    EventType.CALL_PARTICIPANT_JOINED,
    EventType.CALL_PARTICIPANT_LEFT,
)


@dataclass
class World:
    signaling: list[ServiceProcess]
    tap: EventTap
    token: Callable[..., str]
    groups: GroupDirectory
    namespace: str
    rabbitmq_url: str
    devices: list[Device] = field(default_factory=list)
    clients: list[httpx.AsyncClient] = field(default_factory=list)

    def http(self, instance: int = 0) -> httpx.AsyncClient:
        client = httpx.AsyncClient(base_url=self.signaling[instance].url, timeout=15)
        self.clients.append(client)
        return client

    def h(self, user: str) -> dict[str, str]:
        return auth(self.token(user))

    async def device(self, user: str, device_id: str, instance: int = 0) -> Device:
        device = await Device.connect(
            self.signaling[instance].url, self.token(user), user, device_id
        )
        self.devices.append(device)
        return device

    async def group(self, group: str, *members: str) -> None:
        for user in members:
            await self.groups.set_member(group, user, present=True, at=datetime.now(UTC))

    async def start(self, starter: str, group: str, device: str, instance: int = 0) -> str:
        placed = await self.http(instance).post(
            "/v1/calls",
            json={"group": group, "media": "video", "device_id": device},
            headers=self.h(starter),
        )
        assert placed.status_code == 202, placed.text
        body = placed.json()
        assert (body["state"], body["group"], body["callee"]) == ("requested", group, None)
        return str(body["call_id"])

    async def authorize(self, call_id: str, starter: str, group: str, ring: list[str]) -> None:
        event = CallAuthorized(
            call_id=call_id, caller=starter, group=group, media=MediaKind.VIDEO, ring=ring
        )
        await publish_event(self.rabbitmq_url, self.namespace, event)

    async def publish_media_connected(self, call_id: str) -> None:
        event = CallMediaConnected(call_id=call_id, node_id=NODE.node_id)
        await publish_event(self.rabbitmq_url, self.namespace, event)

    def of(self, event_type: EventType, call_id: str, **want: Any) -> list[dict[str, Any]]:
        return [
            m
            for m in self.tap.of(event_type, call_id)
            if all(m.get(k) == v for k, v in want.items())
        ]


@pytest.fixture
async def world(
    spawn: Callable[..., ServiceProcess],
    token: Callable[..., str],
    settings: CommonSettings,
    infra: Infra,
    namespace: str,
    redis_client: Redis,
) -> AsyncIterator[Callable[..., Any]]:
    made: list[World] = []
    stack: list[Any] = []

    async def make(instances: int = 1, **env: str) -> World:
        env = {"RING_TIMEOUT_S": "20", **env}
        procs = [spawn("signaling", **env) for _ in range(instances)]
        await MediaRegistry(redis_client, settings).heartbeat(NODE, ttl_s=600)
        tap_cm = event_tap(infra.rabbitmq_url, namespace, GROUP_EVENTS)
        tap = await tap_cm.__aenter__()
        stack.append(tap_cm)
        directory = GroupDirectory(redis_client, settings)
        w = World(procs, tap, token, directory, namespace, infra.rabbitmq_url)
        made.append(w)
        return w

    yield make
    for w in made:
        for device in w.devices:
            await device.close()
        for client in w.clients:
            await client.aclose()
    for cm in stack:
        await cm.__aexit__(None, None, None)


def states(call: dict[str, Any]) -> dict[str, str]:
    return {p["user"]: p["state"] for p in call["participants"]}


async def test_a_group_call_rings_joins_declines_and_ends_with_its_last_participant(
    world: Callable[..., Any], settings: CommonSettings
) -> None:
    w: World = await world()
    await w.group("g1", "alice", "bob", "carol", "dave", "erin")
    http = w.http()
    a1 = await w.device("alice", "a1")
    b1, b2 = await w.device("bob", "b1"), await w.device("bob", "b2")
    c1, d1, e1 = (
        await w.device("carol", "c1"),
        await w.device("dave", "d1"),
        await w.device("erin", "e1"),
    )

    # carol is busy: in a 1:1 call (frank -> carol) in progress
    placed = await http.post(
        "/v1/calls", json={"callee": "carol", "media": "audio"}, headers=w.h("frank")
    )
    busy_call = placed.json()["call_id"]
    await publish_event(
        w.rabbitmq_url,
        w.namespace,
        CallAuthorized(call_id=busy_call, caller="frank", callee="carol", media=MediaKind.AUDIO),
    )
    await c1.expect(type="call.incoming", call_id=busy_call)
    accepted = await http.post(
        f"/v1/calls/{busy_call}/accept", json={"device_id": "c1"}, headers=w.h("carol")
    )
    assert accepted.status_code == 200, accepted.text

    call_id = await w.start("alice", "g1", "a1")
    requested = await eventually(lambda: w.of(EventType.CALL_REQUESTED, call_id))
    assert requested[0]["invitees"] == ["bob", "carol", "dave", "erin"]
    assert requested[0]["group"] == "g1" and requested[0]["callee"] is None
    again = await http.post(
        "/v1/calls", json={"group": "g1", "media": "audio"}, headers=w.h("dave")
    )
    assert again.status_code == 409, again.text
    assert (again.json()["error"], again.json()["call_id"]) == ("call_in_progress", call_id)
    stranger = await http.post(
        "/v1/calls", json={"group": "g1", "media": "audio"}, headers=w.h("mallory")
    )
    assert stranger.status_code == 404

    # policy rings bob, carol, dave (not erin): carol is busy, so not rung
    await w.authorize(call_id, "alice", "g1", ["bob", "carol", "dave"])
    for device in (b1, b2, d1):
        incoming = await device.expect(type="call.incoming", call_id=call_id)
        assert (incoming["group"], incoming["caller"], incoming["callee"]) == ("g1", "alice", None)
    await a1.expect(type="call.state", call_id=call_id, state="ringing")
    ringing = await w.http().get(f"/v1/calls/{call_id}", headers=w.h("alice"))
    assert states(ringing.json()) == {
        "alice": "joined",
        "bob": "ringing",
        "carol": "not_rung",
        "dave": "ringing",
        "erin": "not_rung",
    }
    await eventually(lambda: len(w.of(EventType.CALL_RINGING, call_id)) == 2)
    assert sorted(m["callee"] for m in w.of(EventType.CALL_RINGING, call_id)) == ["bob", "dave"]
    assert c1.matching(type="call.incoming", call_id=call_id) == []
    assert e1.matching(type="call.incoming", call_id=call_id) == []
    for user in ("carol", "erin"):  # not rung, never joined: not theirs to see (yet)
        hidden = await http.get(f"/v1/calls/{call_id}", headers=w.h(user))
        assert hidden.status_code == 404

    # bob answers on b1: b2 stops, the starter gets its grant, the call is accepted
    answer = await http.post(
        f"/v1/calls/{call_id}/accept", json={"device_id": "b1"}, headers=w.h("bob")
    )
    assert answer.status_code == 200, answer.text
    grant = verify_media_token(settings, answer.json()["media_token"])
    assert (grant.call_id, grant.user_id) == (call_id, "bob")
    elsewhere = await b2.expect(type="call.state", call_id=call_id, answered_elsewhere=True)
    assert "media_token" not in elsewhere
    to_alice = await a1.expect(type="call.state", call_id=call_id, state="accepted")
    assert verify_media_token(settings, to_alice["media_token"]).user_id == "alice"
    accepted_event = await eventually(lambda: w.of(EventType.CALL_ACCEPTED, call_id))
    assert (accepted_event[0]["callee"], accepted_event[0]["device_id"]) == ("bob", "b1")
    await eventually(lambda: w.of(EventType.CALL_PARTICIPANT_JOINED, call_id, user="bob"))

    # erin (not rung) sees the group's call and joins it
    live = await http.get("/v1/groups/g1/call", headers=w.h("erin"))
    assert live.status_code == 200 and live.json()["call_id"] == call_id
    assert (await http.get("/v1/groups/g1/call", headers=w.h("mallory"))).status_code == 404
    assert (await http.get("/v1/groups/g9/call", headers=w.h("erin"))).status_code == 404
    nope = await http.post(f"/v1/calls/{call_id}/join", headers=w.h("mallory"))
    assert nope.status_code == 404
    joined = await http.post(
        f"/v1/calls/{call_id}/join", json={"device_id": "e1"}, headers=w.h("erin")
    )
    assert joined.status_code == 200, joined.text
    assert set(joined.json()) == {
        "call_id",
        "state",
        "media_url",
        "media_token",
        "node_id",
        "ice_servers",
    }
    assert verify_media_token(settings, joined.json()["media_token"]).user_id == "erin"
    twice = await http.post(f"/v1/calls/{call_id}/join", headers=w.h("erin"))
    assert twice.status_code == 409 and twice.json()["participant_state"] == "joined"
    for device in (a1, b1):
        await device.expect(type="call.participant", call_id=call_id, user="erin", state="joined")
    await eventually(lambda: w.of(EventType.CALL_PARTICIPANT_JOINED, call_id, user="erin"))

    # call.signal: `to` is required, pairwise, only between joined participants
    await a1.send({"type": "call.signal", "call_id": call_id, "payload": {"k": 1}})
    await a1.expect(type="error", error="bad_request", call_id=call_id)
    await a1.send({"type": "call.signal", "call_id": call_id, "to": "bob", "payload": {"k": 2}})
    relayed = await b1.expect(type="call.signal", call_id=call_id)
    assert (relayed["from"], relayed["payload"]) == ("alice", {"k": 2})
    await a1.send({"type": "call.signal", "call_id": call_id, "to": "dave", "payload": {}})
    await a1.expect(type="error", error="conflict", call_id=call_id)
    assert b2.matching(type="call.signal") == [] and e1.matching(type="call.signal") == []
    await e1.send({"type": "call.media_state", "call_id": call_id, "audio": "muted", "video": "on"})
    for device in (a1, b1):
        peer = await device.expect(type="call.peer", call_id=call_id, user="erin")
        assert peer["audio"] == "muted"

    # dave declines: the call goes on; he can join it later
    declined = await http.post(f"/v1/calls/{call_id}/decline", headers=w.h("dave"))
    assert declined.status_code == 200 and declined.json()["state"] == "accepted"
    assert states(declined.json())["dave"] == "declined"
    assert (await eventually(lambda: w.of(EventType.CALL_DECLINED, call_id)))[0]["callee"] == "dave"
    rejoin = await http.post(
        f"/v1/calls/{call_id}/join", json={"device_id": "d1"}, headers=w.h("dave")
    )
    assert rejoin.status_code == 200, rejoin.text

    await w.publish_media_connected(call_id)
    await a1.expect(type="call.state", call_id=call_id, state="active")

    # they leave one by one; the call ends with the last
    for user in ("erin", "alice", "dave"):
        left = await http.post(f"/v1/calls/{call_id}/hangup", headers=w.h(user))
        assert left.status_code == 200 and left.json()["state"] == "active", left.text
        assert states(left.json())[user] == "left"
    await eventually(lambda: len(w.of(EventType.CALL_PARTICIPANT_LEFT, call_id)) == 3)
    await b1.expect(type="call.participant", call_id=call_id, user="dave", state="left")
    assert w.of(EventType.CALL_ENDED, call_id) == []
    last = await http.post(f"/v1/calls/{call_id}/hangup", headers=w.h("bob"))
    assert (last.json()["state"], last.json()["end_reason"]) == ("ended", "user_hangup")
    ended = await eventually(lambda: w.of(EventType.CALL_ENDED, call_id))
    assert (ended[0]["group"], ended[0]["callee"], ended[0]["reason"]) == (
        "g1",
        None,
        "user_hangup",
    )
    assert (await http.get("/v1/groups/g1/call", headers=w.h("erin"))).status_code == 404
    late = await http.post(f"/v1/calls/{call_id}/join", headers=w.h("erin"))
    assert late.status_code == 409 and late.json()["state"] == "ended"

    # history: one entry per participant rung or joined, each their own presence
    for user, direction, missed in (
        ("alice", "outgoing", False),
        ("bob", "incoming", False),
        ("erin", "incoming", False),
        ("dave", "incoming", False),
    ):
        page = await http.get("/v1/calls", headers=w.h(user))
        item = next(c for c in page.json()["calls"] if c["call_id"] == call_id)
        assert (item["direction"], item["missed"]) == (direction, missed), user
        assert item["duration_s"] > 0
    carol = await http.get("/v1/calls", headers=w.h("carol"))
    assert call_id not in [c["call_id"] for c in carol.json()["calls"]]
    # a fresh group call may start now
    assert await w.start("dave", "g1", "d1")


async def test_missed_exactly_once_per_invitee_with_two_instances_polling(
    world: Callable[..., Any],
) -> None:
    w: World = await world(2, RING_TIMEOUT_S="1.5")
    await w.group("g2", "ann", "ben", "cat", "dan")
    a1 = await w.device("ann", "a1", instance=0)
    c1 = await w.device("cat", "c1", instance=1)
    call_id = await w.start("ann", "g2", "a1")
    await w.authorize(call_id, "ann", "g2", ["ben", "cat", "dan"])
    await c1.expect(type="call.incoming", call_id=call_id)
    answer = await w.http(1).post(
        f"/v1/calls/{call_id}/join", json={"device_id": "b1"}, headers=w.h("ben")
    )
    assert answer.status_code == 200, answer.text  # a ringing invitee's join is its accept
    await eventually(lambda: len(w.of(EventType.CALL_MISSED, call_id)) == 2, timeout=10)
    await c1.expect(type="call.state", call_id=call_id)
    await a1.expect(type="call.participant", call_id=call_id, user="cat", state="missed")
    await asyncio.sleep(0.5)
    missed = w.of(EventType.CALL_MISSED, call_id)
    assert sorted(m["callee"] for m in missed) == ["cat", "dan"]
    assert all(parse_event(m).type is EventType.CALL_MISSED and m["group"] == "g2" for m in missed)
    assert w.of(EventType.CALL_ENDED, call_id) == []  # ben answered: it goes on
    call = (await w.http().get(f"/v1/calls/{call_id}", headers=w.h("ann"))).json()
    assert states(call) == {"ann": "joined", "ben": "joined", "cat": "missed", "dan": "missed"}
    page = (await w.http().get("/v1/calls", headers=w.h("cat"))).json()["calls"]
    assert [(c["call_id"], c["missed"]) for c in page] == [(call_id, True)]
    for user in ("ann", "ben"):
        await w.http().post(f"/v1/calls/{call_id}/hangup", headers=w.h(user))
    await eventually(lambda: w.of(EventType.CALL_ENDED, call_id))

    # nobody answers: every invitee missed once, and the call ends missed
    second = await w.start("ann", "g2", "a1")
    await w.authorize(second, "ann", "g2", ["ben", "cat"])
    await eventually(lambda: w.of(EventType.CALL_ENDED, second), timeout=10)
    await asyncio.sleep(0.5)
    assert sorted(m["callee"] for m in w.of(EventType.CALL_MISSED, second)) == ["ben", "cat"]
    ended = w.of(EventType.CALL_ENDED, second)
    assert len(ended) == 1 and ended[0]["reason"] == "missed"
    await a1.expect(type="call.state", call_id=second, state="missed")


async def test_a_full_group_call_refuses_one_more_and_the_starter_can_cancel(
    world: Callable[..., Any],
) -> None:
    w: World = await world(GROUP_CALL_MAX_PARTICIPANTS="2")
    await w.group("g3", "una", "vic", "wes")
    w1 = await w.device("wes", "w1")
    http = w.http()
    call_id = await w.start("una", "g3", "u1")
    await w.authorize(call_id, "una", "g3", ["vic", "wes"])
    await w1.expect(type="call.incoming", call_id=call_id)
    assert (
        await http.post(f"/v1/calls/{call_id}/accept", json={"device_id": "v1"}, headers=w.h("vic"))
    ).status_code == 200
    full = await http.post(
        f"/v1/calls/{call_id}/accept", json={"device_id": "w1"}, headers=w.h("wes")
    )
    assert full.status_code == 409, full.text
    assert (full.json()["error"], full.json()["max_participants"]) == ("call_full", 2)
    for user in ("una", "vic"):
        await http.post(f"/v1/calls/{call_id}/hangup", headers=w.h(user))
    await eventually(lambda: w.of(EventType.CALL_ENDED, call_id))
    assert [m["callee"] for m in w.of(EventType.CALL_MISSED, call_id)] == ["wes"]

    # the starter hangs up before anyone answers: cancelled, each ring stopped
    placements = [
        await http.post(  # the same Idempotency-Key twice: one call, the same answer
            "/v1/calls",
            json={"group": "g3", "media": "audio"},
            headers={**w.h("una"), "Idempotency-Key": "k-2"},
        )
        for _ in range(2)
    ]
    assert [p.status_code for p in placements] == [202, 202]
    second = placements[0].json()["call_id"]
    assert placements[1].json()["call_id"] == second
    await w.authorize(second, "una", "g3", ["vic", "wes"])
    await w1.expect(type="call.incoming", call_id=second)
    cancel = await http.post(f"/v1/calls/{second}/hangup", headers=w.h("una"))
    assert cancel.json()["state"] == "cancelled"
    await w1.expect(type="call.state", call_id=second, state="cancelled")
    await eventually(lambda: len(w.of(EventType.CALL_CANCELLED, second)) == 2)
    assert w.of(EventType.CALL_ENDED, second) == []


async def test_a_lost_node_moves_every_joined_participant_and_group_calls_count_as_placements(
    world: Callable[..., Any], settings: CommonSettings, redis_client: Redis
) -> None:
    w: World = await world(
        SIGNALING_NODE_WATCH_MS="200", MEDIA_REJOIN_GRACE_S="1", CALLS_PER_MINUTE="2"
    )
    await w.group("g4", "kim", "lee", "max", "ned")
    await w.group("g5", "kim", "ned")
    http = w.http()
    k1, l1, m1 = (
        await w.device("kim", "k1"),
        await w.device("lee", "l1"),
        await w.device("max", "m1"),
    )
    n1 = await w.device("ned", "n1")
    # a 1:1 placement and a group one take the caller's two slots; a third is refused
    one = await http.post("/v1/calls", json={"callee": "ned", "media": "audio"}, headers=w.h("kim"))
    assert one.status_code == 202
    await http.post(f"/v1/calls/{one.json()['call_id']}/hangup", headers=w.h("kim"))
    call_id = await w.start("kim", "g4", "k1")
    limited = await http.post(
        "/v1/calls", json={"group": "g5", "media": "audio"}, headers=w.h("kim")
    )
    assert limited.status_code == 429, limited.text

    await w.authorize(call_id, "kim", "g4", ["lee", "max", "ned"])
    await n1.expect(type="call.incoming", call_id=call_id)
    for user, device in (("lee", "l1"), ("max", "m1")):
        answer = await http.post(
            f"/v1/calls/{call_id}/accept", json={"device_id": device}, headers=w.h(user)
        )
        assert answer.status_code == 200, answer.text
    await w.publish_media_connected(call_id)
    await k1.expect(type="call.state", call_id=call_id, state="active")

    # the node is lost: every joined participant's in-call device gets its own new grant
    registry = MediaRegistry(redis_client, settings)
    spare = MediaNode(node_id="media-group-2", url="http://127.0.0.1:9/b", capacity=50, load=0)
    await registry.heartbeat(spare, ttl_s=600)
    await registry.deregister(NODE.node_id)
    for device in (k1, l1, m1):
        moved = await device.expect(type="call.media", call_id=call_id)
        assert (moved["reason"], moved["node_id"]) == ("node_lost", spare.node_id)
        grant = verify_media_token(settings, moved["media_token"])
        assert (grant.user_id, grant.node_id) == (device.user, spare.node_id)
    assert n1.matching(type="call.media") == []  # ringing, not joined: nothing to move
    # nobody's media flows on the new node in time: the call ends media_timeout, once
    ended = await eventually(lambda: w.of(EventType.CALL_ENDED, call_id), timeout=10)
    await asyncio.sleep(0.5)
    assert len(w.of(EventType.CALL_ENDED, call_id)) == 1
    assert (ended[0]["reason"], ended[0]["group"]) == ("media_timeout", "g4")
    assert [m["callee"] for m in w.of(EventType.CALL_MISSED, call_id)] == ["ned"]
    await n1.expect(type="call.state", call_id=call_id, state="ended")
