"""The SFU end to end: a real media process, real aiortc clients, the real broker and Redis.

The clients send pre-encoded VP8 (160x120, so they cost little CPU) and Opus, and record
each RTP payload they send and receive: what arrives must be byte for byte what the
other party sent, proof that the SFU decoded nothing.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from services.media.settings import MediaSettings
from shared.auth import MediaGrant, issue_media_token, issue_token
from shared.bus import Bus, Delivery, Scope
from shared.contracts import (
    CallMediaConnected,
    CallMediaFailed,
    Event,
    MediaFailure,
)
from shared.media_registry import MediaRegistry
from tests.support.media import call_ended, encoded_audio, encoded_video, media_token, sessions_url
from tests.support.media import clients as open_clients
from tests.support.waiting import eventually
from tools.media_client import EncodedMedia, MediaClient, encode_vp8
from tools.stack import ServiceProcess

pytestmark = pytest.mark.e2e

NODE = "node-a"


video = pytest.fixture(encoded_video, scope="module")


@pytest.fixture(scope="module")
def video_320() -> EncodedMedia:
    """About 550 kbps: two or three packets a frame, so losses add up quickly."""
    return encode_vp8(320, 240, seconds=2.0, bitrate=550_000)


audio = pytest.fixture(encoded_audio, scope="module")


clients = pytest.fixture(open_clients)


@pytest.fixture
def party(
    clients: Callable[..., MediaClient], video: EncodedMedia, audio: EncodedMedia
) -> Callable[..., MediaClient]:
    """``party(**options)``: a client sending ``video`` and ``audio``, closed after."""
    return lambda **options: clients(video, audio, **options)


@pytest.fixture
def media(spawn: Callable[..., ServiceProcess]) -> ServiceProcess:
    """The module's media node, at its defaults."""
    return spawn("media", MEDIA_NODE_ID=NODE)


@pytest.fixture
async def media_events(
    media_settings: MediaSettings, redis_client: Redis
) -> AsyncIterator[tuple[Bus, list[Event]]]:
    """What the media node publishes, as any consumer on the broker sees it."""
    seen: list[Event] = []

    async def record(event: Any, delivery: Delivery) -> None:
        seen.append(event)

    bus = Bus(media_settings, redis_client, "mediawatch")
    bus.subscribe(
        "events", {CallMediaConnected: record, CallMediaFailed: record}, scope=Scope.INSTANCE
    )
    await bus.start()
    yield bus, seen
    await bus.close()


def received_from(receiver: MediaClient, sender: MediaClient, kind: str) -> tuple[int, int]:
    """(packets received, of which byte-identical to one the sender sent)."""
    sent = set(sender.sent[kind].payloads)
    got = receiver.received[kind].payloads
    return len(got), sum(1 for item in got if item in sent)


async def test_media_flows_both_ways_untouched_and_a_party_can_reconnect(
    media: ServiceProcess,
    media_settings: MediaSettings,
    media_events: tuple[Bus, list[Event]],
    http: httpx.AsyncClient,
    redis_client: Redis,
    party: Callable[..., MediaClient],
) -> None:
    _, events = media_events
    call_id = uuid.uuid4().hex
    url = sessions_url(media, call_id)
    alice, bob = party(), party()
    alice_token = media_token(media_settings, call_id, "alice")
    bob_token = media_token(media_settings, call_id, "bob")
    response = await alice.connect(url, alice_token, http)
    assert response.status_code == 201, response.text
    assert response.headers["content-type"].startswith("application/sdp")
    assert response.text.startswith("v=0") and "a=candidate:" in response.text
    assert response.headers["location"].startswith(f"/v1/rooms/{call_id}/sessions/")
    assert (await bob.connect(url, bob_token, http)).status_code == 201

    async def both_ways() -> bool:
        return all(
            c.received["video"].packets >= 120 and c.received["audio"].packets >= 40
            for c in (alice, bob)
        )

    await eventually(both_ways, timeout=30)
    for receiver, sender in ((bob, alice), (alice, bob)):
        for kind in ("video", "audio"):
            total, identical = received_from(receiver, sender, kind)
            assert total > 0 and identical == total, (kind, total, identical)

    # Lip sync: the SFU's sender reports carry the publisher's NTP/RTP pair (a sender
    # report of its own, without packets of its own, would say NTP 0: year 1900).
    async def sender_report_years() -> list[int] | None:
        report = await bob.pc.getStats()
        years = [s.remoteTimestamp.year for s in report.values() if s.type == "remote-outbound-rtp"]
        return years if len(years) == 2 else None

    assert all(year >= 2024 for year in await eventually(sender_report_years, timeout=20))

    # Bob's decoder lost a frame: his PLI reaches Alice (as a PLI from the SFU).
    await asyncio.sleep(0.6)  # past the SFU's keyframe-request throttle
    before = alice.keyframe_requests
    await bob.request_keyframe()
    await eventually(lambda: alice.keyframe_requests > before, timeout=10)

    # Bob can take only 64 kbps: the REMB the SFU sends Alice goes no higher.
    async def alice_told_to_slow_down() -> bool:
        await bob.send_remb(64_000)
        return any(bitrate <= 64_000 for bitrate in alice.rembs)

    await eventually(alice_told_to_slow_down, timeout=20, step=0.5)

    await eventually(lambda: any(isinstance(e, CallMediaConnected) for e in events))
    connected = next(e for e in events if isinstance(e, CallMediaConnected))
    assert connected.call_id == call_id and connected.node_id == NODE

    stats_url = f"{media.url}/v1/rooms/{call_id}/stats"
    auth = {"Authorization": f"Bearer {alice_token}"}

    async def stats_complete() -> dict[str, Any] | None:
        body = (await http.get(stats_url, headers=auth)).json()
        ok = len(body["participants"]) == 2 and all(
            p["packets_in"] > 0
            and p["packets_out"] > 0
            and p["bytes_in"] > 0
            and p["bitrate_in_bps"] > 0
            and p["rtt_ms"] is not None
            for p in body["participants"]
        )
        return body if ok else None

    body = await eventually(stats_complete, timeout=20)
    assert body["state"] == "connected"
    assert {p["user_id"] for p in body["participants"]} == {"alice", "bob"}
    assert body["node_forward_delay_ms"]["p50"] is not None
    user_view = await http.get(
        stats_url, headers={"Authorization": f"Bearer {issue_token(media_settings, 'bob')}"}
    )
    assert user_view.status_code == 200
    stranger = await http.get(
        stats_url, headers={"Authorization": f"Bearer {issue_token(media_settings, 'eve')}"}
    )
    assert stranger.status_code == 404 and stranger.json()["error"] == "not_found"

    metrics = (await http.get(f"{media.url}/metrics")).text
    assert f'dmcall_media_rooms{{node_id="{NODE}"}} 1.0' in metrics
    assert "dmcall_media_forward_delay_seconds_bucket" in metrics

    registry = MediaRegistry(redis_client, media_settings)

    async def registered_with_load(load: int) -> bool:
        nodes = {n.node_id: n for n in await registry.live_nodes()}
        return NODE in nodes and nodes[NODE].load == load and nodes[NODE].url == media.url

    await eventually(lambda: registered_with_load(1))

    # Alice reconnects: her new session replaces the old; Bob gets the new media (its
    # payloads untouched; its timestamps go on from the old session's, see
    # test_media_continuity.py).
    old_alice, alice = alice, party()
    assert (await alice.connect(url, alice_token, http)).status_code == 201

    async def bob_gets_new_alice() -> bool:
        sent = {payload for _, payload in alice.sent["video"].payloads}
        return sum(1 for _, p in bob.received["video"].payloads if p in sent) >= 60

    await eventually(bob_gets_new_alice, timeout=30)
    await eventually(lambda: old_alice.pc.connectionState == "closed", timeout=20)
    await old_alice.close()
    body = (await http.get(stats_url, headers=auth)).json()
    assert len(body["participants"]) == 2

    # Leaving: a stranger cannot end Bob's session; the room closes when empty.
    bob_session = f"{media.url}{bob.location}"
    eve = {"Authorization": f"Bearer {issue_token(media_settings, 'eve')}"}
    assert (await http.delete(bob_session, headers=eve)).status_code == 403
    assert await alice.leave(http, media.url, alice_token) == 204
    assert await bob.leave(http, media.url, bob_token) == 204
    assert (
        await http.delete(bob_session, headers={"Authorization": f"Bearer {bob_token}"})
    ).status_code == 404
    assert (await http.get(stats_url, headers=auth)).status_code == 404
    await eventually(lambda: registered_with_load(0))
    assert not any(isinstance(e, CallMediaFailed) for e in events)


async def test_lost_packets_are_recovered(
    media: ServiceProcess,
    media_settings: MediaSettings,
    http: httpx.AsyncClient,
    clients: Callable[..., MediaClient],
    video_320: EncodedMedia,
    audio: EncodedMedia,
) -> None:
    """2% of Alice's video never reaches the SFU, 2% of what the SFU sends Bob never
    reaches him: the SFU NACKs Alice (and unwraps her RTX), and answers Bob's NACKs from
    its sender history, so Bob ends up with nearly all of it."""
    call_id = uuid.uuid4().hex
    url = sessions_url(media, call_id)
    alice = clients(video_320, audio, drop_out=0.02, seed=1)
    bob = clients(None, audio, drop_in=0.02, seed=2)  # he talks: the room connects
    assert (
        await alice.connect(url, media_token(media_settings, call_id, "alice"), http)
    ).status_code == 201
    assert (
        await bob.connect(url, media_token(media_settings, call_id, "bob"), http)
    ).status_code == 201
    sent, got = alice.sent["video"], bob.received["video"]
    # 2% of ~600 packets is ~12 each way, but how many of Bob's drops fall on video
    # depends on how audio interleaves: wait until each path has lost more than 5.
    await eventually(
        lambda: got.packets >= 600 and sent.dropped > 5 and got.dropped > 5, timeout=40
    )
    received = set(got.payloads)
    first_ts = min(ts for ts, _ in got.payloads)
    # Judge the packets sent from the first forwarded one up to half a second ago.
    last_ts = max(ts for ts, _ in got.payloads) - 45_000
    expected = [p for p in sent.payloads if first_ts <= p[0] <= last_ts]
    missing = [p for p in expected if p not in received]
    assert len(expected) > 300
    assert len(missing) / len(expected) < 0.01, (len(missing), len(expected))
    assert all(p in set(sent.payloads) for p in received)


async def test_admission_refusals(
    media: ServiceProcess,
    media_settings: MediaSettings,
    media_events: tuple[Bus, list[Event]],
    http: httpx.AsyncClient,
    party: Callable[..., MediaClient],
) -> None:
    bus, _ = media_events
    call_id = uuid.uuid4().hex
    url = sessions_url(media, call_id)
    alice = party()  # her session closes when the call ends

    async def offer(token: str | None, client: MediaClient | None = None) -> httpx.Response:
        client = client or party()
        if token is None:
            await client.pc.setLocalDescription(await client.pc.createOffer())
            return await http.post(url, content=b"v=0", headers={"Content-Type": "application/sdp"})
        return await client.connect(url, token, http)

    def refused(response: httpx.Response, status: int, reason: str) -> None:
        assert response.status_code == status, response.text
        body = response.json()
        assert body["reason"] == reason and body["message"], body
        assert body["error"]

    assert (await offer(media_token(media_settings, call_id, "alice"), alice)).status_code == 201
    assert (await offer(media_token(media_settings, call_id, "bob"))).status_code == 201
    refused(await offer(media_token(media_settings, call_id, "mallory")), 403, "room_full")
    refused(await offer(media_token(media_settings, call_id, "alice", ttl_s=-60)), 401, "bad_token")
    refused(await offer(media_token(media_settings, "another-call", "alice")), 403, "wrong_call")
    refused(
        await offer(media_token(media_settings, call_id, "alice", node_id="node-b")),
        403,
        "wrong_node",
    )
    forged = issue_media_token(
        media_settings.model_copy(update={"media_token_secret": "x" * 40}),
        MediaGrant(call_id, "alice", NODE),
    )
    refused(await offer(forged), 401, "bad_token")
    user_token = issue_token(media_settings, "alice")  # a user token is not a media token
    refused(await offer(user_token), 401, "bad_token")
    missing = await offer(None)
    assert missing.status_code == 401 and missing.json()["error"] == "unauthorized"

    token = media_token(media_settings, call_id, "alice")
    auth = {"Authorization": f"Bearer {token}"}
    wrong_type = await http.post(
        url, content=b"v=0", headers={**auth, "Content-Type": "application/json"}
    )
    assert wrong_type.status_code == 415 and wrong_type.json()["error"] == "unsupported_media_type"
    for body in (b"hello", b"v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\n", b"\xff\xfe"):
        bad = await http.post(
            url, content=body, headers={**auth, "Content-Type": "application/sdp"}
        )
        assert bad.status_code == 400, (body, bad.text)
        assert bad.json()["error"] == "bad_request"
    huge = await http.post(
        url,
        content=b"v=0\n" + b"a" * 200_000,
        headers={**auth, "Content-Type": "application/sdp"},
    )
    assert huge.status_code == 413
    assert (await http.get(f"{media.url}/v1/rooms/{call_id}/stats")).status_code == 401

    # The call ends: the room closes, and the call's tokens no longer open a session.
    await bus.publish(call_ended(call_id))

    async def room_closed() -> bool:
        response = await http.get(f"{media.url}/v1/rooms/{call_id}/stats", headers=auth)
        return response.status_code == 404

    await eventually(room_closed)
    await eventually(lambda: alice.pc.connectionState in ("closed", "failed"), timeout=30)
    refused(await offer(media_token(media_settings, call_id, "alice")), 409, "call_ended")


async def test_a_node_behind_nat_fails_a_call_without_media_and_deregisters(
    spawn: Callable[..., ServiceProcess],
    media_settings: MediaSettings,
    media_events: tuple[Bus, list[Event]],
    http: httpx.AsyncClient,
    redis_client: Redis,
    party: Callable[..., MediaClient],
) -> None:
    _, events = media_events
    low = 20_000 + (uuid.uuid4().int % 400) * 100
    media = spawn(
        "media",
        MEDIA_NODE_ID=NODE,
        MEDIA_TIMEOUT_S="1.5",
        MEDIA_PUBLIC_IP="203.0.113.9",
        MEDIA_UDP_PORT_MIN=str(low),
        MEDIA_UDP_PORT_MAX=str(low + 99),
    )
    call_id = uuid.uuid4().hex
    alice = party()  # Bob never comes
    response = await alice.connect(
        sessions_url(media, call_id), media_token(media_settings, call_id, "alice"), http
    )
    assert response.status_code == 201
    # Behind NAT: the answer announces the public address, on ports of the range.
    candidates = [
        line.split() for line in response.text.splitlines() if line.startswith("a=candidate:")
    ]
    assert candidates and all(c[4] == "203.0.113.9" for c in candidates), candidates
    assert all(low <= int(c[5]) <= low + 99 for c in candidates), candidates
    await eventually(lambda: any(isinstance(e, CallMediaFailed) for e in events))
    failed = next(e for e in events if isinstance(e, CallMediaFailed))
    assert failed.call_id == call_id and failed.reason is MediaFailure.MEDIA_TIMEOUT
    assert not any(isinstance(e, CallMediaConnected) for e in events)
    registry = MediaRegistry(redis_client, media_settings)
    assert NODE in {n.node_id for n in await registry.live_nodes()}
    media.stop()
    assert NODE not in {n.node_id for n in await registry.live_nodes()}
