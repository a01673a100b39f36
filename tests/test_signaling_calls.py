"""Signaling end to end: real signaling processes, the real policy service, RabbitMQ and
Redis. Devices are real WebSockets; events are read off the broker as published."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from shared.auth import verify_media_token
from shared.contracts import (
    CallMediaConnected,
    CallMediaFailed,
    Event,
    EventType,
    MediaFailure,
    parse_event,
)
from shared.media_registry import MediaNode, MediaRegistry
from shared.settings import CommonSettings
from tests.conftest import Infra, auth
from tests.support.signaling import Device, EventTap, allow_call, event_tap, publish_event
from tests.support.waiting import eventually
from tools.stack import ServiceProcess

NODE = MediaNode(node_id="media-test-1", url="http://127.0.0.1:9/", capacity=50, load=0)


@dataclass
class World:
    policy: ServiceProcess | None
    signaling: list[ServiceProcess]
    tap: EventTap
    token: Callable[..., str]
    registry: MediaRegistry
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

    async def allow(self, caller: str, callee: str) -> None:
        assert self.policy is not None
        async with httpx.AsyncClient(base_url=self.policy.url, timeout=15) as policy:
            await allow_call(policy, self.token("platform-svc", scope="platform"), caller, callee)

    async def place(
        self, caller: str, callee: str, *, instance: int = 0, media: str = "audio", **extra: Any
    ) -> str:
        response = await self.http(instance).post(
            "/v1/calls", json={"callee": callee, "media": media, **extra}, headers=self.h(caller)
        )
        assert response.status_code == 202, response.text
        body = response.json()
        assert body["state"] == "requested"
        return str(body["call_id"])

    async def publish(self, event: Event) -> None:
        await publish_event(self.rabbitmq_url, self.namespace, event)


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

    async def make(
        instances: int = 1, *, policy: bool = True, media_node: bool = True, **env: str
    ) -> World:
        env = {"RING_TIMEOUT_S": "5", **env}
        policy_proc = spawn("policy") if policy else None
        procs = [spawn("signaling", **env) for _ in range(instances)]
        registry = MediaRegistry(redis_client, settings)
        if media_node:
            await registry.heartbeat(NODE, ttl_s=600)
        tap_cm = event_tap(infra.rabbitmq_url, namespace)
        tap = await tap_cm.__aenter__()
        stack.append(tap_cm)
        w = World(policy_proc, procs, tap, token, registry, namespace, infra.rabbitmq_url)
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


async def once(tap: EventTap, event_type: EventType, call_id: str) -> dict[str, Any]:
    """Waits for the event, then checks a while longer that it was published only once."""
    await eventually(lambda: tap.of(event_type, call_id))
    await asyncio.sleep(0.5)
    found = tap.of(event_type, call_id)
    assert len(found) == 1, found
    assert parse_event(found[0]).type is event_type  # exactly the contract's fields
    return found[0]


async def test_two_devices_ring_one_answers_the_other_hears_answered_elsewhere(
    world: Callable[..., Any], settings: CommonSettings
) -> None:
    w: World = await world()
    await w.allow("alice", "bob")
    a1 = await w.device("alice", "a1")
    b1, b2 = await w.device("bob", "b1"), await w.device("bob", "b2")

    call_id = await w.place("alice", "bob", media="video", device_id="a1")
    for device in (b1, b2):
        incoming = await device.expect(type="call.incoming", call_id=call_id)
        assert (incoming["caller"], incoming["media"], incoming["state"]) == (
            "alice",
            "video",
            "ringing",
        )
    await a1.expect(type="call.state", call_id=call_id, state="ringing")
    ringing = await once(w.tap, EventType.CALL_RINGING, call_id)
    assert ringing["media"] == "video" and ringing["ring_deadline"]

    http = w.http()
    accepted = await http.post(
        f"/v1/calls/{call_id}/accept", json={"device_id": "b1"}, headers=w.h("bob")
    )
    assert accepted.status_code == 200, accepted.text
    offer = accepted.json()
    assert offer["media_url"] == NODE.session_url(call_id)
    grant = verify_media_token(settings, offer["media_token"])
    assert (grant.call_id, grant.user_id, grant.node_id) == (call_id, "bob", NODE.node_id)

    elsewhere = await b2.expect(type="call.state", call_id=call_id, state="accepted")
    assert elsewhere["answered_elsewhere"] is True
    assert elsewhere["end_reason"] == "answered_elsewhere"
    assert "media_token" not in elsewhere
    to_caller = await a1.expect(type="call.state", call_id=call_id, state="accepted")
    assert to_caller["answered_elsewhere"] is False
    caller_grant = verify_media_token(settings, to_caller["media_token"])
    assert (caller_grant.user_id, caller_grant.call_id) == ("alice", call_id)
    assert to_caller["media_url"] == NODE.session_url(call_id)
    assert (await once(w.tap, EventType.CALL_ACCEPTED, call_id))["device_id"] == "b1"

    # The key exchange rides on call.signal, relayed verbatim to the answering device only.
    payload = {"kind": "offer", "sdp": "v=0\r\n", "keys": [1, 2, {"x": None}]}
    await a1.send({"type": "call.signal", "call_id": call_id, "payload": payload})
    relayed = await b1.expect(type="call.signal", call_id=call_id)
    assert relayed["payload"] == payload
    assert (relayed["from"], relayed["from_device"]) == ("alice", "a1")
    await b1.send({"type": "call.signal", "call_id": call_id, "payload": {"kind": "answer"}})
    assert (await a1.expect(type="call.signal", call_id=call_id))["payload"] == {"kind": "answer"}
    assert b2.matching(type="call.signal") == []

    await w.publish(CallMediaConnected(call_id=call_id, node_id=NODE.node_id))
    await a1.expect(type="call.state", call_id=call_id, state="active")
    await b1.expect(type="call.state", call_id=call_id, state="active")

    hangup = await http.post(f"/v1/calls/{call_id}/hangup", headers=w.h("alice"))
    assert hangup.status_code == 200
    assert (hangup.json()["state"], hangup.json()["end_reason"]) == ("ended", "user_hangup")
    await b1.expect(type="call.state", call_id=call_id, state="ended")
    ended = await once(w.tap, EventType.CALL_ENDED, call_id)
    assert ended["reason"] == "user_hangup" and ended["duration_s"] >= 0
    again = await http.post(f"/v1/calls/{call_id}/hangup", headers=w.h("bob"))
    assert again.status_code == 409 and again.json()["state"] == "ended"

    # A media failure ends an answered call with the media's reason.
    second = await w.place("alice", "bob")
    await b1.expect(type="call.incoming", call_id=second)
    answer = await http.post(
        f"/v1/calls/{second}/accept", json={"device_id": "b2"}, headers=w.h("bob")
    )
    assert answer.status_code == 200
    await w.publish(
        CallMediaFailed(call_id=second, node_id=NODE.node_id, reason=MediaFailure.ICE_FAILED)
    )
    failed = await a1.expect(type="call.state", call_id=second, state="ended")
    assert failed["end_reason"] == "ice_failed"
    assert (await once(w.tap, EventType.CALL_ENDED, second))["reason"] == "ice_failed"


async def test_decline_cancel_missed_busy_and_rejected(world: Callable[..., Any]) -> None:
    w: World = await world(RING_TIMEOUT_S="2")
    await w.allow("carol", "dave")
    http = w.http()
    c1 = await w.device("carol", "c1")
    d1, d2 = await w.device("dave", "d1"), await w.device("dave", "d2")

    # Decline on one device stops all; declining again, or your own call, is a conflict.
    declined = await w.place("carol", "dave")
    await d2.expect(type="call.incoming", call_id=declined)
    own = await http.post(f"/v1/calls/{declined}/decline", headers=w.h("carol"))
    assert own.status_code == 409 and own.json()["state"] == "ringing"
    response = await http.post(f"/v1/calls/{declined}/decline", headers=w.h("dave"))
    assert response.status_code == 200 and response.json()["end_reason"] == "declined"
    for device in (c1, d1, d2):
        await device.expect(type="call.state", call_id=declined, state="declined")
    await once(w.tap, EventType.CALL_DECLINED, declined)
    again = await http.post(f"/v1/calls/{declined}/decline", headers=w.h("dave"))
    assert again.status_code == 409 and again.json()["state"] == "declined"

    # The caller's hangup before an answer is a cancel, and stops every device.
    cancelled = await w.place("carol", "dave")
    await d1.expect(type="call.incoming", call_id=cancelled)
    response = await http.post(f"/v1/calls/{cancelled}/hangup", headers=w.h("carol"))
    assert response.json()["state"] == "cancelled"
    for device in (d1, d2):
        await device.expect(type="call.state", call_id=cancelled, state="cancelled")
    await once(w.tap, EventType.CALL_CANCELLED, cancelled)

    # Nobody answers: missed, once, by the server's timer; a late accept is a conflict.
    missed = await w.place("carol", "dave")
    await d1.expect(type="call.incoming", call_id=missed)
    for device in (c1, d1, d2):
        state = await device.expect(timeout=20, type="call.state", call_id=missed, state="missed")
        assert state["end_reason"] == "missed"
    event = await once(w.tap, EventType.CALL_MISSED, missed)
    assert (event["caller"], event["callee"], event["media"]) == ("carol", "dave", "audio")
    late = await http.post(
        f"/v1/calls/{missed}/accept", json={"device_id": "d1"}, headers=w.h("dave")
    )
    assert late.status_code == 409 and late.json()["state"] == "missed"
    call = (await http.get(f"/v1/calls/{missed}", headers=w.h("dave"))).json()
    assert call["state"] == "missed"
    assert datetime.fromisoformat(call["ended_at"]) >= datetime.fromisoformat(call["ring_deadline"])

    # Busy: dave is in an answered call, so erin's call ends busy without ringing him.
    in_call = await w.place("carol", "dave")
    await d1.expect(type="call.incoming", call_id=in_call)
    ok = await http.post(
        f"/v1/calls/{in_call}/accept", json={"device_id": "d1"}, headers=w.h("dave")
    )
    assert ok.status_code == 200
    await w.allow("erin", "dave")
    e1 = await w.device("erin", "e1")
    busy = await w.place("erin", "dave")
    state = await e1.expect(type="call.state", call_id=busy, state="busy")
    assert state["end_reason"] == "busy"
    ended = await once(w.tap, EventType.CALL_ENDED, busy)
    assert (ended["reason"], ended["callee"], ended["duration_s"]) == ("busy", "dave", 0.0)
    assert w.tap.of(EventType.CALL_RINGING, busy) == []
    assert d1.matching(type="call.incoming", call_id=busy) == []
    history = (await http.get("/v1/calls", headers=w.h("dave"))).json()["calls"]
    assert {"call_id": busy, "direction": "incoming", "missed": True}.items() <= next(
        c for c in history if c["call_id"] == busy
    ).items()

    # Policy says no: the caller hears the caller-safe reason; the callee never sees it.
    f1 = await w.device("frank", "f1")
    rejected = await w.place("frank", "dave")
    state = await f1.expect(type="call.state", call_id=rejected, state="rejected")
    assert state["reject_reason"] == "caller_not_premium"
    assert state["end_reason"] == "rejected_by_policy"
    hidden = await http.get(f"/v1/calls/{rejected}", headers=w.h("dave"))
    assert hidden.status_code == 404
    assert d1.matching(call_id=rejected) == []


async def test_glare_and_two_devices_accepting_at_once(world: Callable[..., Any]) -> None:
    w: World = await world()
    await w.allow("alice", "bob")
    await w.allow("bob", "alice")
    http = w.http()
    a1, b1 = await w.device("alice", "a1"), await w.device("bob", "b1")

    first = await w.place("alice", "bob", device_id="a1")
    await b1.expect(type="call.incoming", call_id=first)
    second = await w.place("bob", "alice", device_id="b1")
    assert first < second
    # The lesser id survives and connects at once; the other ends, replaced by it.
    for device in (a1, b1):
        won = await device.expect(type="call.state", call_id=first, state="accepted")
        assert won["media_token"] and won["answered_elsewhere"] is False
    lost = await b1.expect(type="call.state", call_id=second, state="cancelled")
    assert lost["replaced_by"] == first
    assert (await once(w.tap, EventType.CALL_ACCEPTED, first))["device_id"] == "b1"
    await once(w.tap, EventType.CALL_CANCELLED, second)
    for user in ("alice", "bob"):
        ids = [
            c["call_id"] for c in (await http.get("/v1/calls", headers=w.h(user))).json()["calls"]
        ]
        assert ids == [first], (user, ids)

    # Two devices accept the same call at the same instant: exactly one wins.
    await w.allow("gina", "hal")
    h1, h2 = await w.device("hal", "h1"), await w.device("hal", "h2")
    race = await w.place("gina", "hal")
    await h1.expect(type="call.incoming", call_id=race)
    await h2.expect(type="call.incoming", call_id=race)
    other = w.http()
    results = await asyncio.gather(
        http.post(f"/v1/calls/{race}/accept", json={"device_id": "h1"}, headers=w.h("hal")),
        other.post(f"/v1/calls/{race}/accept", json={"device_id": "h2"}, headers=w.h("hal")),
    )
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 409], [r.text for r in results]
    loser = next(r for r in results if r.status_code == 409)
    assert loser.json()["state"] == "accepted"
    winner_device = (await once(w.tap, EventType.CALL_ACCEPTED, race))["device_id"]
    loser_device = "h2" if winner_device == "h1" else "h1"
    loser_socket = h2 if loser_device == "h2" else h1
    told = await loser_socket.expect(type="call.state", call_id=race, state="accepted")
    assert told["answered_elsewhere"] is True
    # The winning device may ask again (a retry) and gets a fresh token.
    retry = await http.post(
        f"/v1/calls/{race}/accept", json={"device_id": winner_device}, headers=w.h("hal")
    )
    assert retry.status_code == 200 and retry.json()["media_token"]


async def test_ring_state_history_idempotency_rate_limit_and_no_media_node(
    world: Callable[..., Any],
) -> None:
    w: World = await world(CALLS_PER_MINUTE="5", RING_TIMEOUT_S="30")
    await w.allow("alice", "bob")
    http = w.http()

    first = await http.post(
        "/v1/calls",
        json={"callee": "bob", "media": "audio"},
        headers={**w.h("alice"), "Idempotency-Key": "k-1"},
    )
    retried = await http.post(
        "/v1/calls",
        json={"callee": "bob", "media": "audio"},
        headers={**w.h("alice"), "Idempotency-Key": "k-1"},
    )
    assert first.status_code == retried.status_code == 202
    call_id = first.json()["call_id"]
    assert retried.json()["call_id"] == call_id
    await once(w.tap, EventType.CALL_REQUESTED, call_id)

    # A device that was away reads the ring state, and is told again when it reconnects.
    async def ringing() -> bool:
        state = (await http.get("/v1/ring-state", headers=w.h("bob"))).json()
        return any(c["call_id"] == call_id for c in state["calls"])

    await eventually(ringing)
    state = (await http.get("/v1/ring-state", headers=w.h("bob"))).json()["calls"]
    assert [(c["call_id"], c["direction"], c["state"]) for c in state] == [
        (call_id, "incoming", "ringing")
    ]
    outgoing = (await http.get("/v1/ring-state", headers=w.h("alice"))).json()["calls"]
    assert [(c["call_id"], c["direction"]) for c in outgoing] == [(call_id, "outgoing")]
    back = await w.device("bob", "b1")
    await back.expect(type="call.incoming", call_id=call_id)

    # No live media node: accept is refused with 503 and the call keeps ringing.
    await w.registry.deregister(NODE.node_id)
    refused = await http.post(
        f"/v1/calls/{call_id}/accept", json={"device_id": "b1"}, headers=w.h("bob")
    )
    assert refused.status_code == 503 and refused.json()["error"] == "unavailable"
    assert (await http.get(f"/v1/calls/{call_id}", headers=w.h("bob"))).json()["state"] == "ringing"
    await w.registry.heartbeat(NODE, ttl_s=600)
    ok = await http.post(
        f"/v1/calls/{call_id}/accept", json={"device_id": "b1"}, headers=w.h("bob")
    )
    assert ok.status_code == 200
    fresh = await http.post(f"/v1/calls/{call_id}/media", headers=w.h("alice"))
    assert fresh.status_code == 200 and fresh.json()["media_url"] == NODE.session_url(call_id)
    await http.post(f"/v1/calls/{call_id}/hangup", headers=w.h("bob"))

    # History: newest first, by pages.
    placed = [call_id]
    for _ in range(4):
        placed.append(await w.place("alice", "bob"))
    limited = await http.post(
        "/v1/calls", json={"callee": "bob", "media": "audio"}, headers=w.h("alice")
    )
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"] == "rate_limited"
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"before": cursor} if cursor else {})}
        page = (await http.get("/v1/calls", params=params, headers=w.h("alice"))).json()
        assert len(page["calls"]) <= 2
        seen += [c["call_id"] for c in page["calls"]]
        assert all(c["direction"] == "outgoing" for c in page["calls"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(placed, reverse=True)
    bob_history = (await http.get("/v1/calls", headers=w.h("bob"))).json()["calls"]
    answered = next(c for c in bob_history if c["call_id"] == call_id)
    assert answered["direction"] == "incoming" and answered["missed"] is False
    assert answered["duration_s"] >= 0


async def test_bad_input_gets_clear_errors_and_the_socket_stays_up(
    world: Callable[..., Any],
) -> None:
    w: World = await world(policy=False, MAX_BODY_BYTES="4096", SIGNALING_WS_MESSAGES_PER_S="6")
    http = w.http()
    h = w.h("alice")
    cases = [
        ({"callee": "bob smith", "media": "audio"}, 422),
        ({"callee": "x" * 65, "media": "audio"}, 422),
        ({"callee": "bob", "media": "smell"}, 422),
        ({"callee": 7, "media": "audio"}, 422),
        ({"callee": "bob"}, 422),
        ({"callee": "bob", "media": "audio", "extra": 1}, 422),
    ]
    for body, code in cases:
        response = await http.post("/v1/calls", json=body, headers=h)
        assert response.status_code == code, (body, response.text)
        assert response.json()["error"] == "validation_error"
    malformed = await http.post(
        "/v1/calls", content=b"{not json", headers={**h, "Content-Type": "application/json"}
    )
    assert malformed.status_code == 422
    huge = await http.post("/v1/calls", content=b"x" * 100_000, headers=h)
    assert huge.status_code == 413 and huge.json()["error"] == "payload_too_large"
    assert (
        await http.post("/v1/calls", json={"callee": "bob", "media": "audio"})
    ).status_code == 401
    forged = {"Authorization": "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.bad"}
    assert (await http.get("/v1/calls", headers=forged)).status_code == 401
    assert (await http.get("/v1/calls", params={"limit": 0}, headers=h)).status_code == 422
    assert (await http.get("/v1/calls", params={"before": "zz!"}, headers=h)).status_code == 422
    unknown = await http.get("/v1/calls/0123abcd", headers=h)
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"
    bad_accept = await http.post("/v1/calls/0123abcd/accept", json={"device_id": "a b"}, headers=h)
    assert bad_accept.status_code == 422

    call_id = await w.place("alice", "bob")  # no policy here: it stays requested
    peek = await http.get(f"/v1/calls/{call_id}", headers=w.h("mallory"))
    assert peek.status_code == 404
    steal = await http.post(
        f"/v1/calls/{call_id}/accept", json={"device_id": "m1"}, headers=w.h("mallory")
    )
    assert steal.status_code == 404
    own = await http.post(f"/v1/calls/{call_id}/accept", json={"device_id": "a1"}, headers=h)
    assert own.status_code == 409 and own.json()["state"] == "requested"

    # WebSocket: refused tokens and device ids close with a reason...
    base = w.signaling[0].url
    bad_token = await Device.connect(base, "not-a-token", "x", "d1")
    await bad_token.closed.wait()
    assert bad_token.received[0]["error"] == "unauthorized"
    assert bad_token.ws.close_code == 4401
    bad_device = await Device.connect(base, w.token("alice"), "alice", "bad%20device")
    await bad_device.closed.wait()
    assert bad_device.ws.close_code == 4400

    # ...and malformed frames get an error each while the socket stays open.
    m1 = await w.device("mallory", "m1")
    frames: list[Any] = [
        "not json",
        "[1, 2]",
        json.dumps({"type": "call.dance"}),
        json.dumps({"type": "call.signal", "payload": {}}),
        json.dumps({"type": "call.signal", "call_id": call_id, "payload": "text"}),
        json.dumps({"type": "call.signal", "call_id": call_id, "payload": {"x": "y" * 70_000}}),
        b"\xff\xfe",
    ]
    for frame in frames:
        await m1.send(frame)
    await eventually(lambda: len(m1.matching(type="error")) >= len(frames))
    assert {e["error"] for e in m1.matching(type="error")} == {"bad_request"}
    await m1.send({"type": "call.signal", "call_id": call_id, "payload": {"sdp": "x"}})
    refused = await m1.expect(type="error", error="not_found")
    assert refused["call_id"] == call_id
    await m1.send({"type": "ping"})
    await m1.expect(type="pong")
    assert (await http.get("/healthz")).status_code == 200
    # A flood gets errors (dropped frames), not a dead socket.
    flood = await w.device("mallory", "m2")
    for _ in range(40):
        await flood.send({"type": "call.signal", "call_id": call_id, "payload": {}})
    await eventually(lambda: len(flood.matching(type="error")) == 40)
    assert len(flood.matching(error="rate_limited")) >= 20
    await asyncio.sleep(0.5)
    await flood.send({"type": "ping"})
    await flood.expect(type="pong")
    # The web client is served at / behind the API routes.
    page = await http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert (await http.get("/v1/nothing-here")).json()["error"] == "not_found"


async def test_two_instances_and_a_sigkilled_instance_still_misses_the_call_once(
    world: Callable[..., Any],
) -> None:
    w: World = await world(instances=2, RING_TIMEOUT_S="3")
    await w.allow("alice", "bob")
    on_first, on_second = w.http(0), w.http(1)
    a1 = await w.device("alice", "a1", instance=0)
    b1 = await w.device("bob", "b1", instance=1)

    # Caller on one instance, callee on the other: the whole call works.
    call_id = await w.place("alice", "bob", instance=0, device_id="a1")
    await b1.expect(type="call.incoming", call_id=call_id)
    ok = await on_second.post(
        f"/v1/calls/{call_id}/accept", json={"device_id": "b1"}, headers=w.h("bob")
    )
    assert ok.status_code == 200
    await a1.expect(type="call.state", call_id=call_id, state="accepted")
    await a1.send({"type": "call.signal", "call_id": call_id, "payload": {"n": 1}})
    assert (await b1.expect(type="call.signal", call_id=call_id))["payload"] == {"n": 1}
    await on_first.post(f"/v1/calls/{call_id}/hangup", headers=w.h("alice"))
    await b1.expect(type="call.state", call_id=call_id, state="ended")

    # The callee's instance dies while the call rings: the survivor misses it, once.
    ringing = await w.place("alice", "bob", instance=0)
    await b1.expect(type="call.incoming", call_id=ringing)
    w.signaling[1].kill()
    missed = await a1.expect(timeout=20, type="call.state", call_id=ringing, state="missed")
    assert missed["end_reason"] == "missed"
    event = await once(w.tap, EventType.CALL_MISSED, ringing)
    assert event["callee"] == "bob"
    await asyncio.sleep(1.0)
    assert len(w.tap.of(EventType.CALL_MISSED, ringing)) == 1
    call = (await on_first.get(f"/v1/calls/{ringing}", headers=w.h("alice"))).json()
    lateness = datetime.fromisoformat(call["ended_at"]) - datetime.fromisoformat(
        call["ring_deadline"]
    )
    print(f"missed {lateness.total_seconds() * 1000:.0f} ms after the deadline")
