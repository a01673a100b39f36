"""The media node's limits, end to end: a real media process, real aiortc clients, the
real broker and Redis.

- F1: a node remembers only the ended calls it hosted or was granted, and forgets them
  after ``MEDIA_ENDED_CALL_MEMORY_S`` even if nobody asks about them again.
- F13: the SFU sends no ICE check to a candidate outside the allowed networks (loopback,
  link-local, private unless configured, mDNS names), nor past the per-offer cap; a party
  whose own candidates were all dropped still connects (its checks make peer-reflexive
  candidates).
- F18: an offer the SFU could never connect (no DTLS fingerprint, no DTLS role, no ICE
  credentials) is refused with 400 ``bad_offer`` instead of 201 and a failure later.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from services.media.settings import MediaSettings
from shared.bus import Bus
from tests.support.media import call_ended, encoded_audio, media_token, sessions_url
from tests.support.media import clients as open_clients
from tests.support.waiting import eventually
from tools.media_client import EncodedMedia, MediaClient
from tools.stack import ServiceProcess

pytestmark = pytest.mark.e2e

NODE = "node-limits"


audio = pytest.fixture(encoded_audio, scope="module")


clients = pytest.fixture(open_clients)


@pytest.fixture
def party(clients: Callable[..., MediaClient], audio: EncodedMedia) -> Callable[[], MediaClient]:
    """``party()``: a client sending audio only, closed after the test."""
    return lambda: clients(None, audio)


def metric_values(text: str, name: str, **labels: str) -> list[float]:
    """Every sample of ``name`` whose labels include ``labels``."""
    values = []
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        if series.split("{", 1)[0] != name:
            continue
        if all(f'{key}="{wanted}"' in series for key, wanted in labels.items()):
            values.append(float(value))
    return values


async def scrape(http: httpx.AsyncClient, media: ServiceProcess) -> str:
    return (await http.get(f"{media.url}/metrics")).text


class Blackhole(asyncio.DatagramProtocol):
    """A UDP port that counts the datagrams it gets and answers none."""

    def __init__(self) -> None:
        self.datagrams = 0

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.datagrams += 1


async def open_blackhole(host: str) -> tuple[Blackhole, asyncio.BaseTransport, int]:
    hole = Blackhole()
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: hole, local_addr=(host, 0)
    )
    return hole, transport, transport.get_extra_info("sockname")[1]


def add_candidates(lines: list[str]) -> Callable[[str], str]:
    """``lines`` (``a=candidate:...``) put first among the first media section's candidates."""

    def rewrite(sdp: str) -> str:
        first = re.search(r"^a=candidate:", sdp, flags=re.MULTILINE)
        assert first is not None, sdp
        extra = "".join(f"{line}\r\n" for line in lines)
        return sdp[: first.start()] + extra + sdp[first.start() :]

    return rewrite


def without(pattern: str) -> Callable[[str], str]:
    return lambda sdp: re.sub(rf"^{pattern}.*\r?\n", "", sdp, flags=re.MULTILINE)


async def test_f18_an_offer_the_sfu_cannot_connect_is_refused_as_bad_offer(
    spawn: Callable[..., ServiceProcess],
    media_settings: MediaSettings,
    http: httpx.AsyncClient,
    party: Callable[..., MediaClient],
) -> None:
    """F18: no ``a=fingerprint`` (or no ``a=setup``, no ICE credentials): 400 bad_offer."""
    media = spawn("media", MEDIA_NODE_ID=NODE)
    for broken in (
        without("a=fingerprint:"),
        without("a=setup:"),
        without("a=ice-ufrag:"),
        without("a=ice-pwd:"),
        # Only an algorithm aiortc cannot check: no fingerprint it can verify.
        lambda sdp: re.sub(r"^a=fingerprint:\S+", "a=fingerprint:md5", sdp, flags=re.M),
    ):
        call_id = uuid.uuid4().hex
        response = await party().connect(
            sessions_url(media, call_id),
            media_token(media_settings, call_id, "alice"),
            http,
            rewrite_offer=broken,
            apply_answer=False,
        )
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["error"] == "bad_request" and body["reason"] == "bad_offer", body
        assert body["message"], body
        stats = await http.get(
            f"{media.url}/v1/rooms/{call_id}/stats",
            headers={"Authorization": f"Bearer {media_token(media_settings, call_id, 'a')}"},
        )
        assert stats.status_code == 404, stats.text  # no room was left behind
    refused = metric_values(
        await scrape(http, media), "dmcall_media_sessions_refused_total", reason="bad_offer"
    )
    assert refused == [5.0], refused


async def test_f13_the_sfu_checks_only_allowed_candidates_and_at_most_the_cap(
    spawn: Callable[..., ServiceProcess],
    media_settings: MediaSettings,
    http: httpx.AsyncClient,
    party: Callable[..., MediaClient],
) -> None:
    """F13: loopback outside the allowed networks, link-local, mDNS and candidates past
    ``MEDIA_ICE_MAX_CANDIDATES`` get no connectivity check; the party still connects."""
    media = spawn(
        "media",
        MEDIA_NODE_ID=NODE,
        MEDIA_ICE_CANDIDATE_NETWORKS='["127.0.0.2/32"]',
        MEDIA_ICE_MAX_CANDIDATES="2",
    )
    loopback, t1, loopback_port = await open_blackhole("127.0.0.1")
    kept_1, t2, kept_1_port = await open_blackhole("127.0.0.2")
    kept_2, t3, kept_2_port = await open_blackhole("127.0.0.2")
    over_cap, t4, over_cap_port = await open_blackhole("127.0.0.2")
    # The dropped ones have the highest priorities: were they kept, they would be checked
    # before the kept ones (aioice checks the pairs in priority order).
    extra = [
        f"a=candidate:1 1 udp 2130706431 127.0.0.1 {loopback_port} typ host",
        f"a=candidate:2 1 udp 2130706430 169.254.10.20 {loopback_port} typ host",
        f"a=candidate:3 1 udp 2130706429 {uuid.uuid4()}.local {loopback_port} typ host",
        f"a=candidate:4 1 udp 2130706000 127.0.0.2 {kept_1_port} typ host",
        f"a=candidate:5 1 udp 2130705000 127.0.0.2 {kept_2_port} typ host",
        f"a=candidate:6 1 udp 2130706428 127.0.0.2 {over_cap_port} typ host",
    ]
    silent = party()
    client = party()
    try:
        # A session that never answers a check: the SFU goes through every pair it has.
        call_id = uuid.uuid4().hex
        response = await silent.connect(
            sessions_url(media, call_id),
            media_token(media_settings, call_id, "alice"),
            http,
            rewrite_offer=add_candidates(extra),
            apply_answer=False,
        )
        assert response.status_code == 201, response.text
        await eventually(lambda: kept_1.datagrams > 0 and kept_2.datagrams > 0, timeout=20)
        assert loopback.datagrams == 0
        assert over_cap.datagrams == 0
        dropped = metric_values(
            await scrape(http, media), "dmcall_media_ice_candidates_dropped_total"
        )
        assert dropped and dropped[0] >= 4, dropped

        # A party whose own candidates (on this host's address, outside the allowed
        # networks) are all dropped: the SFU learns its address from its checks.
        call_id = uuid.uuid4().hex
        response = await client.connect(
            sessions_url(media, call_id), media_token(media_settings, call_id, "bob"), http
        )
        assert response.status_code == 201, response.text
        await eventually(lambda: client.pc.connectionState == "connected", timeout=20)
    finally:
        for transport in (t1, t2, t3, t4):
            transport.close()


async def test_f1_a_node_remembers_only_its_own_ended_calls_and_forgets_them(
    spawn: Callable[..., ServiceProcess],
    media_settings: MediaSettings,
    http: httpx.AsyncClient,
    redis_client: Redis,
    party: Callable[..., MediaClient],
) -> None:
    """F1: the ones it hosted or was granted are refused for MEDIA_ENDED_CALL_MEMORY_S,
    ended calls this node never saw only for MEDIA_UNSEEN_ENDED_CALL_MEMORY_S (while a
    token for them may still be valid); all are forgotten without a lookup."""
    media = spawn(
        "media",
        MEDIA_NODE_ID=NODE,
        MEDIA_ENDED_CALL_MEMORY_S="3",
        MEDIA_UNSEEN_ENDED_CALL_MEMORY_S="3",
    )
    bus = Bus(media_settings, redis_client, "limits")
    await bus.start()
    hosted, granted = uuid.uuid4().hex, uuid.uuid4().hex
    client = party()
    others = 300
    try:
        response = await client.connect(
            sessions_url(media, hosted),
            media_token(media_settings, hosted, "alice"),
            http,
            apply_answer=False,
        )
        assert response.status_code == 201, response.text
        # A grant presented with an offer that is refused: the node knows of the call.
        refused = await http.post(
            sessions_url(media, granted),
            content=b"hello",
            headers={
                "Authorization": f"Bearer {media_token(media_settings, granted, 'bob')}",
                "Content-Type": "application/sdp",
            },
        )
        assert refused.status_code == 400, refused.text

        for call_id in [uuid.uuid4().hex for _ in range(others)] + [hosted, granted]:
            await bus.publish(call_ended(call_id))

        async def all_handled() -> bool:
            handled = metric_values(
                await scrape(http, media), "dmcall_bus_handled_total", service="media"
            )
            return sum(handled) >= others + 2

        await eventually(all_handled, timeout=60)
        text = await scrape(http, media)
        assert metric_values(text, "dmcall_media_remembered_calls", kind="ended") == [2.0], text
        unseen = metric_values(text, "dmcall_media_remembered_calls", kind="unseen_ended")
        assert unseen == [float(others)], text  # only for as long as a token may come
        for call_id in (hosted, granted):
            late = await party().connect(
                sessions_url(media, call_id),
                media_token(media_settings, call_id, "alice"),
                http,
                apply_answer=False,
            )
            assert late.status_code == 409 and late.json()["reason"] == "call_ended", late.text

        async def forgotten() -> bool:
            text = await scrape(http, media)
            ended = metric_values(text, "dmcall_media_remembered_calls", kind="ended")
            grants = metric_values(text, "dmcall_media_remembered_calls", kind="granted")
            unseen = metric_values(text, "dmcall_media_remembered_calls", kind="unseen_ended")
            return ended == [0.0] and grants == [0.0] and unseen == [0.0]

        # Forgotten by time alone: nothing looks these calls up again.
        await eventually(forgotten, timeout=20)
    finally:
        await bus.close()
