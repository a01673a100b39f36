"""Signaling's limits and hardening (issue 12), end to end: real signaling processes, the
real policy, RabbitMQ and Redis; devices are real WebSockets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from shared.contracts import EventType
from tests import test_signaling_calls
from tests.conftest import Infra
from tests.support.broker_gate import BrokerGate
from tests.support.signaling import Device, World
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

world = test_signaling_calls.world  # the same fixture as the calls tests

CLOSE_TOKEN_EXPIRED = 4419
CLOSE_TOO_MANY_DEVICES = 4429


async def _attached(device: Device) -> Device:
    """The socket's device is registered once it answers a ping."""
    await device.send({"type": "ping"})
    await device.expect(type="pong")
    device.received.clear()
    return device


# --------------------------------------------------------------------------- F15


async def test_f15_a_deeply_nested_frame_gets_bad_request_and_the_socket_stays(
    world: Callable[..., Any],
) -> None:
    w: World = await world(policy=False)
    device = await _attached(await w.device("mallory", "m1"))
    await device.send("[" * 30_000)
    await device.send('{"type": "call.signal", "call_id": "abc", "payload": ' + "[" * 30_000)
    await device.send('{"type": "call.signal", "call_id": "abc", "payload": ' + '{"a":' * 5_000)
    # an integer past Python's 4,300-digit limit: bad_request too, not an internal error
    await device.send(
        '{"type": "call.signal", "call_id": "abc", "payload": {"n": ' + "9" * 5_000 + "}}"
    )
    await eventually(lambda: len(device.matching(type="error")) >= 4)
    assert {e["error"] for e in device.matching(type="error")} == {"bad_request"}
    await device.send({"type": "ping"})
    await device.expect(type="pong")
    assert not device.closed.is_set()

    # The same payload as an HTTP body: a 4xx with the JSON error body, never a 500.
    http = w.http()
    for body in ("[" * 30_000, '{"callee": ' + "[" * 30_000):
        response = await http.post(
            "/v1/calls",
            content=body,
            headers={**w.h("mallory"), "Content-Type": "application/json"},
        )
        assert 400 <= response.status_code < 500, response.text
        assert response.json()["error"] in ("bad_request", "validation_error")
    assert (await http.get("/healthz")).status_code == 200


# --------------------------------------------------------------------------- F11


async def test_f11_concurrent_retries_with_one_idempotency_key_cost_one_placement(
    world: Callable[..., Any],
) -> None:
    w: World = await world(policy=False, CALLS_PER_MINUTE="2")
    http = w.http()
    headers = {**w.h("alice"), "Idempotency-Key": "retry-storm-1"}
    body = {"callee": "bob", "media": "audio"}
    responses = await asyncio.gather(
        *(http.post("/v1/calls", json=body, headers=headers) for _ in range(12))
    )
    assert [r.status_code for r in responses] == [202] * 12, [r.text for r in responses]
    assert len({r.json()["call_id"] for r in responses}) == 1
    # ...and a later replay, too, costs nothing.
    again = await http.post("/v1/calls", json=body, headers=headers)
    assert again.status_code == 202 and again.json()["call_id"] == responses[0].json()["call_id"]

    # The budget of 2 a minute still has one placement left, then it is spent.
    other = await http.post(
        "/v1/calls", json=body, headers={**w.h("alice"), "Idempotency-Key": "k2"}
    )
    assert other.status_code == 202, other.text
    spent = await http.post(
        "/v1/calls", json=body, headers={**w.h("alice"), "Idempotency-Key": "k3"}
    )
    assert spent.status_code == 429


# --------------------------------------------------------------------------- F10


async def test_f10_a_socket_closes_when_its_token_expires_and_can_refresh_in_band(
    world: Callable[..., Any], token: Callable[..., str]
) -> None:
    w: World = await world(policy=False)
    base = w.signaling[0].url
    short = await Device.connect(base, token("alice", ttl_s=2), "alice", "a1")
    w.devices.append(short)
    await _attached(short)
    await asyncio.wait_for(short.closed.wait(), 20)
    assert short.ws.close_code == CLOSE_TOKEN_EXPIRED
    assert short.matching(type="error", error="token_expired")

    # A client may hand the socket a fresh token before the old one runs out.
    kept = await Device.connect(base, token("alice", ttl_s=2), "alice", "a2")
    w.devices.append(kept)
    await _attached(kept)
    await kept.send({"type": "auth.refresh", "token": token("bob", ttl_s=3600)})
    assert (await kept.expect(type="error", error="forbidden"))["message"]
    await kept.send({"type": "auth.refresh", "token": "not-a-token"})
    await kept.expect(type="error", error="unauthorized")
    await kept.send({"type": "auth.refresh", "token": token("alice", ttl_s=6)})
    refreshed = await kept.expect(type="auth.refreshed")
    assert refreshed["expires_at"]
    await asyncio.sleep(3)  # past the first token's expiry
    kept.received.clear()
    await kept.send({"type": "ping"})
    await kept.expect(type="pong")
    await asyncio.wait_for(kept.closed.wait(), 20)
    assert kept.ws.close_code == CLOSE_TOKEN_EXPIRED


# --------------------------------------------------------------------------- F5


async def test_f5_device_sockets_per_user_are_capped_across_instances(
    world: Callable[..., Any],
) -> None:
    w: World = await world(instances=2, policy=False, SIGNALING_MAX_DEVICES_PER_USER="2")
    d1 = await _attached(await w.device("alice", "d1", instance=0))
    d2 = await _attached(await w.device("alice", "d2", instance=1))
    d3 = await _attached(await w.device("alice", "d3", instance=0))
    await asyncio.wait_for(d1.closed.wait(), 15)
    assert d1.ws.close_code == CLOSE_TOO_MANY_DEVICES
    assert d1.matching(type="error", error="too_many_devices")
    # The oldest socket is on the other instance: that instance closes it.
    d4 = await _attached(await w.device("alice", "d4", instance=0))
    await asyncio.wait_for(d2.closed.wait(), 15)
    assert d2.ws.close_code == CLOSE_TOO_MANY_DEVICES
    for device in (d3, d4):
        await device.send({"type": "ping"})
        await device.expect(type="pong")
        assert not device.closed.is_set()
    # Reconnecting the same device id replaces its socket and is no new device.
    d4_again = await _attached(await w.device("alice", "d4", instance=1))
    await asyncio.wait_for(d4.closed.wait(), 15)
    assert d4.ws.close_code == 4409
    await d3.send({"type": "ping"})
    await d3.expect(type="pong")
    assert not d3.closed.is_set() and not d4_again.closed.is_set()


async def test_f5_call_signal_is_limited_per_user_and_call_and_ringing_fans_out_to_a_few(
    world: Callable[..., Any],
) -> None:
    w: World = await world(
        SIGNALING_SIGNALS_PER_CALL_PER_S="1",
        SIGNALING_RING_SIGNAL_DEVICES="2",
        SIGNALING_WS_MESSAGES_PER_S="1000",
        RING_TIMEOUT_S="60",
    )
    await w.allow("alice", "bob")
    a1 = await _attached(await w.device("alice", "a1"))
    a2 = await _attached(await w.device("alice", "a2"))
    bobs = [await _attached(await w.device("bob", f"b{i}")) for i in range(1, 5)]
    call_id = await w.place("alice", "bob")
    for device in bobs:
        await device.expect(type="call.incoming", call_id=call_id)

    # While it rings, the caller's signal reaches the callee's most recently connected
    # devices only (here 2 of 4).
    await a1.send({"type": "call.signal", "call_id": call_id, "payload": {"n": 0}})
    for device in bobs[2:]:
        await device.expect(type="call.signal", call_id=call_id)
    await asyncio.sleep(0.5)
    assert [len(d.matching(type="call.signal")) for d in bobs] == [0, 0, 1, 1]

    # One budget for the user's call, whichever socket sends: the rest is refused.
    started = time.monotonic()
    for n in range(1, 11):
        await a1.send({"type": "call.signal", "call_id": call_id, "payload": {"n": n}})
        await a2.send({"type": "call.signal", "call_id": call_id, "payload": {"n": n}})
    await eventually(
        lambda: (
            len(a1.matching(type="error"))
            + len(a2.matching(type="error"))
            + len(bobs[3].matching(type="call.signal"))
            - 1
            >= 20
        )
    )
    elapsed = time.monotonic() - started
    relayed = len(bobs[3].matching(type="call.signal")) - 1
    # A burst of twice the rate, plus what refilled meanwhile.
    assert relayed <= 2 + int(elapsed) + 1, (relayed, elapsed)
    assert a2.matching(type="error", error="rate_limited", call_id=call_id)
    assert a1.matching(type="error", error="rate_limited", call_id=call_id)


# --------------------------------------------------------------------------- F9


@pytest.fixture
def broker_gate(infra: Infra) -> Iterator[BrokerGate]:
    gate = BrokerGate(infra.rabbitmq_url).start()
    yield gate
    gate.stop()


async def test_f9_placing_a_call_does_not_wait_for_the_broker_and_the_event_follows(
    world: Callable[..., Any], broker_gate: BrokerGate
) -> None:
    # Signaling reaches the broker through the gate; policy and the test directly.
    w: World = await world(RABBITMQ_URL=broker_gate.url)
    await w.allow("alice", "bob")
    http = w.http()

    broker_gate.shut()

    async def unready() -> bool:
        ready = await http.get("/readyz")
        return ready.status_code == 503

    await eventually(unready, timeout=20)
    # The publish timeout is 15 s: an answer within 5 s did not wait for the broker.
    async with httpx.AsyncClient(base_url=w.signaling[0].url, timeout=5) as quick:
        placed = await quick.post(
            "/v1/calls", json={"callee": "bob", "media": "audio"}, headers=w.h("alice")
        )
        assert placed.status_code == 202, placed.text
        call_id = placed.json()["call_id"]
        assert placed.json()["state"] == "requested"
        got = await quick.get(f"/v1/calls/{call_id}", headers=w.h("alice"))
        assert got.json()["state"] == "requested"

    broker_gate.open()
    await eventually(lambda: w.tap.of(EventType.CALL_REQUESTED, call_id), timeout=60)

    async def ringing() -> bool:
        call = (await http.get(f"/v1/calls/{call_id}", headers=w.h("alice"))).json()
        return call["state"] == "ringing"

    await eventually(ringing, timeout=30)
