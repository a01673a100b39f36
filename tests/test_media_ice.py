"""ICE failure, end to end: real signaling, policy and media processes, real aiortc
clients, RabbitMQ and Redis.

A session whose ICE never connects (its offer's candidates lead to a UDP port that takes
the SFU's connectivity checks and answers none) fails the call with ``ice_failed`` after
``MEDIA_ICE_TIMEOUT_S``, not the tens of seconds aioice takes to give up, and not as a
``media_timeout``. A connection that fails outright (a DTLS fingerprint that does not
match) is ``ice_failed`` at once, without waiting for the deadline.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from aioice.ice import get_host_addresses
from redis.asyncio import Redis

from services.media.settings import MediaSettings
from shared.bus import Bus, Delivery, Scope
from shared.contracts import CallMediaFailed, EventType, MediaFailure, parse_event
from shared.media_registry import MediaRegistry
from tests.conftest import auth
from tests.support.media import clients as open_clients
from tests.support.media import media_token, sessions_url
from tests.support.signaling import World, place_and_accept
from tests.support.waiting import eventually
from tools.media_client import MediaClient, encode_opus
from tools.stack import ServiceProcess

pytestmark = pytest.mark.e2e

NODE = "node-ice"

clients = pytest.fixture(open_clients)


class Blackhole(asyncio.DatagramProtocol):
    """A UDP port that takes every datagram and answers none."""

    def __init__(self) -> None:
        self.datagrams = 0

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.datagrams += 1


@pytest.fixture
async def blackhole() -> AsyncIterator[tuple[Blackhole, str, int]]:
    # An address the SFU gathers its host candidates on (it skips loopback).
    host = get_host_addresses(use_ipv4=True, use_ipv6=False)[0]
    hole = Blackhole()
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: hole, local_addr=(host, 0)
    )
    port = transport.get_extra_info("sockname")[1]
    yield hole, host, port
    transport.close()


def candidates_into(host: str, port: int) -> Callable[[str], str]:
    """Every ICE candidate of an offer, pointed at ``host:port``."""

    def rewrite(sdp: str) -> str:
        return re.sub(
            r"^(a=candidate:\S+ \d+ udp \d+) \S+ \d+ (typ host)",
            rf"\1 {host} {port} \2",
            sdp,
            flags=re.MULTILINE | re.IGNORECASE,
        )

    return rewrite


def wrong_fingerprint(sdp: str) -> str:
    """The offer's DTLS fingerprints, each hex digit changed: no certificate matches."""
    flip = str.maketrans("0123456789ABCDEFabcdef", "123456789ABCDEF0bcdef0")

    def one(match: re.Match[str]) -> str:
        return match[1] + match[2].translate(flip)

    return re.sub(r"^(a=fingerprint:\S+ )([0-9A-Fa-f:]+)", one, sdp, flags=re.MULTILINE)


def metric(text: str, line_start: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_a_party_whose_ice_never_connects_ends_the_call_with_ice_failed(
    spawn: Callable[..., ServiceProcess],
    worlds: Callable[..., Any],
    clients: Callable[..., MediaClient],
    blackhole: tuple[Blackhole, str, int],
) -> None:
    hole, host, port = blackhole
    # MEDIA_TIMEOUT_S is shorter than the ICE deadline on purpose: a session still
    # connecting is judged by its ICE deadline, so the call fails for its real cause.
    media = spawn(
        "media", wait=False, MEDIA_NODE_ID=NODE, MEDIA_ICE_TIMEOUT_S="3", MEDIA_TIMEOUT_S="1"
    )
    world: World = await worlds(policy=True, node=None)  # started side by side with the node
    media.wait_ready()
    await eventually(lambda: _has_node(world.registry, NODE))  # the node's first heartbeat
    http = world.http()
    await world.allow("alice", "bob")
    a1, b1 = await world.device("alice", "a1"), await world.device("bob", "b1")
    bob = clients(None, None)  # his offer leads nowhere, and he never starts ICE
    alice = clients(None, encode_opus(1.0))  # her connection works
    call_id, accepted = await place_and_accept(http, world.token, a1, b1)
    offer = accepted.json()
    assert offer["node_id"] == NODE
    to_alice = await a1.expect(type="call.state", call_id=call_id, state="accepted")

    joined = await bob.connect(
        offer["media_url"],
        offer["media_token"],
        http,
        rewrite_offer=candidates_into(host, port),
        apply_answer=False,
    )
    assert joined.status_code == 201, joined.text
    joined = await alice.connect(to_alice["media_url"], to_alice["media_token"], http)
    assert joined.status_code == 201, joined.text

    for device in (a1, b1):
        ended = await device.expect(timeout=20, type="call.state", call_id=call_id, state="ended")
        assert ended["end_reason"] == "ice_failed", ended
    for user in ("alice", "bob"):
        call = (await http.get(f"/v1/calls/{call_id}", headers=world.h(user))).json()
        assert (call["state"], call["end_reason"]) == ("ended", "ice_failed"), call
    assert hole.datagrams > 0  # the SFU did send its checks; nobody answered

    # The media node gave up once, and closed the room: it can publish no more.
    async with httpx.AsyncClient(base_url=media.url, timeout=15) as media_http:
        stats = await media_http.get(
            f"/v1/rooms/{call_id}/stats", headers=auth(to_alice["media_token"])
        )
        assert stats.status_code == 404
        metrics = (await media_http.get("/metrics")).text
    assert metric(metrics, 'dmcall_media_failures_total{reason="ice_failed"}') == 1.0
    assert metric(metrics, 'dmcall_media_failures_total{reason="media_timeout"}') == 0.0
    assert (
        metric(metrics, 'dmcall_media_events_published_total{event_type="call_media_failed"}')
        == 1.0
    )
    assert metric(
        metrics, 'dmcall_media_events_published_total{event_type="call_media_connected"}'
    ) in (None, 0.0)
    ended_events = await eventually(lambda: world.tap.of(EventType.CALL_ENDED, call_id))
    assert len(ended_events) == 1, ended_events
    event = parse_event(ended_events[0])
    assert event.type is EventType.CALL_ENDED and ended_events[0]["reason"] == "ice_failed"

    # Coming back on a new session does not reopen a call that ended.
    retry = clients(None, encode_opus(0.2))
    again = await retry.connect(to_alice["media_url"], to_alice["media_token"], http)
    assert again.status_code == 409 and again.json()["reason"] == "call_ended"


async def _has_node(registry: MediaRegistry, node_id: str) -> bool:
    return node_id in {n.node_id for n in await registry.live_nodes()}


async def test_a_connection_that_fails_is_ice_failed_at_once(
    spawn: Callable[..., ServiceProcess],
    media_settings: MediaSettings,
    redis_client: Redis,
    http: httpx.AsyncClient,
    clients: Callable[..., MediaClient],
) -> None:
    # Deadlines far away: only the connection's own failed state can end this call soon.
    media = spawn("media", MEDIA_NODE_ID=NODE, MEDIA_ICE_TIMEOUT_S="120", MEDIA_TIMEOUT_S="120")
    failures: list[CallMediaFailed] = []

    async def record(event: Any, delivery: Delivery) -> None:
        assert isinstance(event, CallMediaFailed)
        failures.append(event)

    bus = Bus(media_settings, redis_client, "icewatch")
    bus.subscribe("failures", {CallMediaFailed: record}, scope=Scope.INSTANCE)
    await bus.start()
    call_id = "dtls-mismatch"
    token = media_token(media_settings, call_id, "alice")
    try:
        joined = await clients(None, encode_opus(1.0)).connect(
            sessions_url(media, call_id), token, http, rewrite_offer=wrong_fingerprint
        )
        assert joined.status_code == 201, joined.text
        await eventually(lambda: failures, timeout=15)
        assert (failures[0].call_id, failures[0].node_id) == (call_id, NODE)
        assert failures[0].reason is MediaFailure.ICE_FAILED

        async def room_closed() -> bool:
            response = await http.get(f"{media.url}/v1/rooms/{call_id}/stats", headers=auth(token))
            return response.status_code == 404

        await eventually(room_closed)
        metrics = (await http.get(f"{media.url}/metrics")).text
        assert metric(metrics, 'dmcall_media_failures_total{reason="ice_failed"}') == 1.0
        assert len(failures) == 1
    finally:
        await bus.close()
