"""Calls that survive, at the media node: a real media process, real aiortc clients, the
real broker (a tap on the calls exchange) and Redis.

- A rejoin (a new session for the same party) is make-before-break, and the other
  party's receiver sees one stream: sequence numbers and RTP timestamps go on, and the
  rejoined party's video starts with a keyframe. The media gap at that receiver (last
  packet before the switch, first after) is printed (``-s``), see docs/media.md.
- A party whose packets stop is ``reconnecting`` (``call_media_peer``), ``connected``
  again once it rejoins; one gone longer than ``MEDIA_REJOIN_GRACE_S`` fails the call
  ``media_timeout``.
- SIGTERM drains the node: ``draining`` in the registry, ``media_node_draining`` with its
  calls, forwarding goes on, new sessions are refused 503 ``node_draining``, and the
  process exits by itself once the parties left (or after ``MEDIA_DRAIN_S``).
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from services.media.forwarder import is_vp8_keyframe_start
from services.media.settings import MediaSettings
from shared.auth import MediaGrant, issue_media_token
from shared.contracts import EventType
from shared.media_registry import MediaNode, MediaRegistry
from tests.support.signaling import EventTap
from tests.support.waiting import eventually
from tools.media_client import EncodedMedia, MediaClient, encode_opus, encode_vp8
from tools.stack import ServiceProcess

pytestmark = pytest.mark.e2e

NODE = "node-live"


@pytest.fixture(scope="module")
def videos() -> tuple[EncodedMedia, EncodedMedia]:
    """Two encodings of the same size: a rejoined session's packets are told apart by
    their payloads (the noise differs)."""
    return (
        encode_vp8(160, 120, seconds=2.0, bitrate=150_000),
        encode_vp8(160, 120, seconds=2.0, bitrate=150_000),
    )


@pytest.fixture(scope="module")
def audios() -> tuple[EncodedMedia, EncodedMedia]:
    return encode_opus(1.0), encode_opus(1.0)


def media_token(settings: MediaSettings, call_id: str, user: str, node_id: str = NODE) -> str:
    return issue_media_token(settings, MediaGrant(call_id, user, node_id))


def sessions_url(proc: ServiceProcess, call_id: str) -> str:
    return f"{proc.url}/v1/rooms/{call_id}/sessions"


def peer_events(tap: EventTap, call_id: str) -> list[tuple[str, str]]:
    return [(m["user"], m["connection"]) for m in tap.of(EventType.CALL_MEDIA_PEER, call_id)]


async def start_call(
    media: ServiceProcess,
    settings: MediaSettings,
    http: httpx.AsyncClient,
    alice: MediaClient,
    bob: MediaClient,
    tap: EventTap,
) -> str:
    """Both parties in a room, media flowing both ways, call_media_connected published."""
    call_id = uuid.uuid4().hex
    url = sessions_url(media, call_id)
    for client, user in ((alice, "alice"), (bob, "bob")):
        response = await client.connect(url, media_token(settings, call_id, user), http)
        assert response.status_code == 201, response.text
    await eventually(
        lambda: all(c.received["video"].packets >= 30 for c in (alice, bob)), timeout=30
    )
    await eventually(lambda: tap.of(EventType.CALL_MEDIA_CONNECTED, call_id), timeout=15)
    return call_id


def ssrcs(client: MediaClient) -> dict[str, int]:
    return {t.kind: t.sender._ssrc for t in client.pc.getTransceivers()}


def sent_by(client: MediaClient, kind: str, ssrc: int) -> set[bytes]:
    flow = client.sent[kind]
    return {
        payload
        for (_, payload), (*_, sent_ssrc) in zip(flow.payloads, flow.arrivals, strict=True)
        if sent_ssrc == ssrc
    }


def switch_at(receiver: MediaClient, kind: str, old: set[bytes], new: set[bytes]) -> dict[str, Any]:
    """Where the receiver's stream of ``kind`` went from the old session's packets to the
    new one's: the last old packet and the first new one (arrival, seq, timestamp)."""
    flow = receiver.received[kind]
    rows = [
        (at, seq, ts, payload)
        for (_, payload), (at, seq, ts, _) in zip(flow.payloads, flow.arrivals, strict=True)
    ]
    first_new = next(i for i, row in enumerate(rows) if row[3] in new)
    last_old = max(i for i, row in enumerate(rows[:first_new]) if row[3] in old)
    return {"last_old": rows[last_old], "first_new": rows[first_new], "rows": rows}


async def test_a_rejoin_keeps_the_other_partys_stream_continuous_and_media_flows_again(
    spawn: Callable[..., ServiceProcess],
    media_settings: MediaSettings,
    http: httpx.AsyncClient,
    tap: EventTap,
    videos: tuple[EncodedMedia, EncodedMedia],
    audios: tuple[EncodedMedia, EncodedMedia],
) -> None:
    media = spawn("media", MEDIA_NODE_ID=NODE)
    alice, bob = MediaClient(videos[0], audios[0]), MediaClient(videos[0], audios[0])
    try:
        call_id = await start_call(media, media_settings, http, alice, bob, tap)
        old = ssrcs(alice)
        bob_keyframe_requests = bob.keyframe_requests
        alice_got = alice.received["video"].packets
        started = time.monotonic()
        rejoined = await alice.rejoin(
            sessions_url(media, call_id),
            media_token(media_settings, call_id, "alice"),
            http,
            video=videos[1],
            audio=audios[1],
        )
        assert rejoined.status_code == 201, rejoined.text
        new = ssrcs(alice)
        assert alice.rejoins[0][1] is not None  # the new connection carried media...
        assert alice.retired[0].connectionState == "closed"  # ...then the old one closed

        async def flowing_again() -> bool:
            got = bob.received["video"].payloads
            fresh = sent_by(alice, "video", new["video"])
            return sum(1 for _, p in got if p in fresh) >= 60

        await eventually(flowing_again, timeout=30)
        assert alice.received["video"].packets >= alice_got + 30  # Bob's video, on the new pc
        assert bob.keyframe_requests > bob_keyframe_requests  # for Alice's new connection

        gaps: dict[str, float] = {}
        clock = {"video": 90_000, "audio": 48_000}
        for kind in ("video", "audio"):
            switch = switch_at(
                bob,
                kind,
                sent_by(alice, kind, old[kind]),
                sent_by(alice, kind, new[kind]),
            )
            last_at, last_seq, last_ts, _ = switch["last_old"]
            first_at, first_seq, first_ts, first_payload = switch["first_new"]
            # One stream for Bob's receiver: the next sequence number, and a timestamp
            # advanced by about the time between the two packets (not a random new base).
            assert first_seq == (last_seq + 1) & 0xFFFF, (kind, last_seq, first_seq)
            advanced = (first_ts - last_ts) & 0xFFFFFFFF
            assert 0 < advanced < clock[kind] * (first_at - last_at + 1), (kind, advanced)
            if kind == "video":
                assert is_vp8_keyframe_start(first_payload)
            # No jump anywhere in what Bob received, before, at or after the switch.
            rows = switch["rows"]
            for (_, seq_a, ts_a, _), (_, seq_b, ts_b, _) in itertools.pairwise(rows):
                step = ((ts_b - ts_a + 2**31) & 0xFFFFFFFF) - 2**31
                assert abs(step) < clock[kind] * 5, (kind, seq_a, seq_b, ts_a, ts_b)
            gaps[kind] = first_at - last_at
        print(
            f"\nrejoin media gap at the other party's receiver: video {gaps['video'] * 1000:.0f} ms,"
            f" audio {gaps['audio'] * 1000:.0f} ms; rejoin carried after "
            f"{(alice.rejoins[0][1] - started) * 1000:.0f} ms"
        )
        assert peer_events(tap, call_id) == []  # nobody's media stopped
        assert tap.of(EventType.CALL_MEDIA_FAILED, call_id) == []
    finally:
        await asyncio.gather(alice.close(), bob.close())


async def test_a_party_whose_packets_stop_is_reconnecting_then_connected_after_it_rejoins(
    spawn: Callable[..., ServiceProcess],
    media_settings: MediaSettings,
    http: httpx.AsyncClient,
    tap: EventTap,
    videos: tuple[EncodedMedia, EncodedMedia],
    audios: tuple[EncodedMedia, EncodedMedia],
) -> None:
    media = spawn("media", MEDIA_NODE_ID=NODE, MEDIA_STALL_S="1", MEDIA_REJOIN_GRACE_S="30")
    alice, bob = MediaClient(videos[0], audios[0]), MediaClient(videos[0], audios[0])
    try:
        call_id = await start_call(media, media_settings, http, alice, bob, tap)
        alice.go_offline()  # her network goes away: nothing closes, nothing arrives
        await eventually(lambda: peer_events(tap, call_id), timeout=15)
        await asyncio.sleep(2)  # silent on: still reconnecting, said once
        assert peer_events(tap, call_id) == [("alice", "reconnecting")]
        event = tap.of(EventType.CALL_MEDIA_PEER, call_id)[0]
        assert event["node_id"] == NODE
        alice.go_offline(False)
        rejoined = await alice.rejoin(
            sessions_url(media, call_id), media_token(media_settings, call_id, "alice"), http
        )
        assert rejoined.status_code == 201, rejoined.text
        await eventually(lambda: len(peer_events(tap, call_id)) >= 2, timeout=15)
        assert peer_events(tap, call_id) == [("alice", "reconnecting"), ("alice", "connected")]
        bob_got = bob.received["video"].packets
        await eventually(lambda: bob.received["video"].packets >= bob_got + 30, timeout=15)
        assert tap.of(EventType.CALL_MEDIA_FAILED, call_id) == []
    finally:
        await asyncio.gather(alice.close(), bob.close())


async def test_a_party_gone_longer_than_the_rejoin_grace_fails_the_call_with_media_timeout(
    spawn: Callable[..., ServiceProcess],
    media_settings: MediaSettings,
    http: httpx.AsyncClient,
    tap: EventTap,
    videos: tuple[EncodedMedia, EncodedMedia],
    audios: tuple[EncodedMedia, EncodedMedia],
) -> None:
    media = spawn("media", MEDIA_NODE_ID=NODE, MEDIA_STALL_S="1", MEDIA_REJOIN_GRACE_S="3")
    alice, bob = MediaClient(videos[0], audios[0]), MediaClient(videos[0], audios[0])
    try:
        call_id = await start_call(media, media_settings, http, alice, bob, tap)
        alice.go_offline()
        await eventually(lambda: peer_events(tap, call_id), timeout=15)
        # Reconnecting is not the end: within the grace the call has not failed.
        assert tap.of(EventType.CALL_MEDIA_FAILED, call_id) == []
        failed = await eventually(lambda: tap.of(EventType.CALL_MEDIA_FAILED, call_id), timeout=20)
        assert len(failed) == 1 and failed[0]["reason"] == "media_timeout", failed
        assert failed[0]["node_id"] == NODE
        assert peer_events(tap, call_id) == [("alice", "reconnecting")]
        # The room is gone, and the call is remembered as over: no rejoin reopens it.
        alice.go_offline(False)
        again = await alice.rejoin(
            sessions_url(media, call_id), media_token(media_settings, call_id, "alice"), http
        )
        assert again.status_code == 409 and again.json()["reason"] == "call_ended"
    finally:
        await asyncio.gather(alice.close(), bob.close())


async def node_in_registry(registry: MediaRegistry, node_id: str) -> MediaNode | None:
    return next((n for n in await registry.live_nodes() if n.node_id == node_id), None)


async def exited(proc: ServiceProcess, timeout: float) -> int:
    assert proc.proc is not None
    popen = proc.proc
    await eventually(lambda: popen.poll() is not None, timeout=timeout, step=0.2)
    return int(popen.returncode)


async def test_sigterm_drains_the_node_it_forwards_on_refuses_new_sessions_and_exits_when_empty(
    spawn: Callable[..., ServiceProcess],
    media_settings: MediaSettings,
    http: httpx.AsyncClient,
    tap: EventTap,
    redis_client: Redis,
    videos: tuple[EncodedMedia, EncodedMedia],
    audios: tuple[EncodedMedia, EncodedMedia],
) -> None:
    # The drain deadline is far: only the parties leaving can end this drain soon.
    media = spawn("media", MEDIA_NODE_ID=NODE, MEDIA_STALL_S="1", MEDIA_DRAIN_S="120")
    registry = MediaRegistry(redis_client, media_settings)
    alice, bob = MediaClient(videos[0], audios[0]), MediaClient(videos[0], audios[0])
    late = MediaClient(videos[0], audios[0])
    try:
        call_id = await start_call(media, media_settings, http, alice, bob, tap)
        node = await eventually(lambda: node_in_registry(registry, NODE))
        assert not node.draining
        assert media.proc is not None
        media.proc.send_signal(signal.SIGTERM)

        async def draining() -> bool:
            found = await node_in_registry(registry, NODE)
            return found is not None and found.draining

        await eventually(draining, timeout=10)
        announced = await eventually(
            lambda: [m for m in tap.messages if m["type"] == "media_node_draining"], timeout=10
        )
        assert len(announced) == 1, announced
        assert announced[0]["node_id"] == NODE and announced[0]["call_ids"] == [call_id]

        # Forwarding goes on both ways while the call moves.
        got = {c: c.received["video"].packets for c in (alice, bob)}
        await eventually(
            lambda: all(c.received["video"].packets >= got[c] + 60 for c in (alice, bob)),
            timeout=15,
        )
        # No new room, and no new session in this one either: 503 node_draining.
        other = uuid.uuid4().hex
        refused = await late.connect(
            sessions_url(media, other), media_token(media_settings, other, "carol"), http
        )
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "node_draining"
        assert refused.json()["reason"] == "node_draining"
        rejoin = await alice.rejoin(
            sessions_url(media, call_id), media_token(media_settings, call_id, "alice"), http
        )
        assert rejoin.status_code == 503 and rejoin.json()["error"] == "node_draining"
        assert media.proc.poll() is None  # still serving its call
        metrics = (await http.get(f"{media.url}/metrics")).text
        assert f'dmcall_media_draining{{node_id="{NODE}"}} 1.0' in metrics

        # Both parties move elsewhere (their connections here close): the node exits.
        await asyncio.gather(alice.close(), bob.close())
        assert await exited(media, timeout=20) == 0
        assert await node_in_registry(registry, NODE) is None
        # A draining node's calls are moving: it reported no failure, no reconnecting.
        assert tap.of(EventType.CALL_MEDIA_FAILED, call_id) == []
        assert peer_events(tap, call_id) == []
    finally:
        await asyncio.gather(alice.close(), bob.close(), late.close())


async def test_a_draining_node_exits_after_media_drain_s_when_its_parties_never_leave(
    spawn: Callable[..., ServiceProcess],
    media_settings: MediaSettings,
    http: httpx.AsyncClient,
    tap: EventTap,
    redis_client: Redis,
    videos: tuple[EncodedMedia, EncodedMedia],
    audios: tuple[EncodedMedia, EncodedMedia],
) -> None:
    media = spawn("media", MEDIA_NODE_ID=NODE, MEDIA_DRAIN_S="3")
    alice, bob = MediaClient(videos[0], audios[0]), MediaClient(videos[0], audios[0])
    try:
        call_id = await start_call(media, media_settings, http, alice, bob, tap)
        assert media.proc is not None
        media.proc.send_signal(signal.SIGTERM)
        await eventually(
            lambda: [m for m in tap.messages if m["type"] == "media_node_draining"], timeout=10
        )
        got = bob.received["video"].packets
        assert await exited(media, timeout=20) == 0  # the parties are still sending
        assert bob.received["video"].packets > got  # it forwarded until it left
        assert await node_in_registry(MediaRegistry(redis_client, media_settings), NODE) is None
        assert tap.of(EventType.CALL_MEDIA_FAILED, call_id) == []
    finally:
        await asyncio.gather(alice.close(), bob.close())


async def test_both_parties_move_from_a_draining_node_to_another_and_media_flows_again(
    spawn: Callable[..., ServiceProcess],
    media_settings: MediaSettings,
    http: httpx.AsyncClient,
    tap: EventTap,
    videos: tuple[EncodedMedia, EncodedMedia],
    audios: tuple[EncodedMedia, EncodedMedia],
) -> None:
    """What a rolling deploy does to a call (signaling's part, the grants for the new
    node, is played by the test): the media gap at each receiver is printed."""
    old_node = spawn("media", MEDIA_NODE_ID=NODE, MEDIA_STALL_S="1")
    new_node = spawn("media", MEDIA_NODE_ID="node-next")
    alice, bob = MediaClient(videos[0], audios[0]), MediaClient(videos[0], audios[0])
    try:
        call_id = await start_call(old_node, media_settings, http, alice, bob, tap)
        assert old_node.proc is not None
        old_node.proc.send_signal(signal.SIGTERM)
        await eventually(
            lambda: [m for m in tap.messages if m["type"] == "media_node_draining"], timeout=10
        )
        moved_at = time.monotonic()
        got = {c: c.received["video"].packets for c in (alice, bob)}
        answers = await asyncio.gather(
            *(
                client.rejoin(
                    sessions_url(new_node, call_id),
                    media_token(media_settings, call_id, user, "node-next"),
                    http,
                )
                for client, user in ((alice, "alice"), (bob, "bob"))
            )
        )
        assert [a.status_code for a in answers] == [201, 201], [a.text for a in answers]
        await eventually(
            lambda: all(c.received["video"].packets >= got[c] + 60 for c in (alice, bob)),
            timeout=20,
        )
        connected = await eventually(
            lambda: [
                m
                for m in tap.of(EventType.CALL_MEDIA_CONNECTED, call_id)
                if m["node_id"] == "node-next"
            ]
        )
        assert len(connected) == 1
        assert await exited(old_node, timeout=20) == 0  # both left it: it exits by itself
        report = []
        for name, client in (("alice", alice), ("bob", bob)):
            for kind in ("video", "audio"):
                gap = client.received[kind].largest_gap(moved_at - 1.0)
                assert gap is not None
                report.append(f"{name} {kind} {gap * 1000:.0f} ms")
        print("\nmove to another node, media gap at each receiver: " + ", ".join(report))
        assert tap.of(EventType.CALL_MEDIA_FAILED, call_id) == []
    finally:
        await asyncio.gather(alice.close(), bob.close())


async def test_clients_rejoin_by_themselves_when_their_node_dies(
    spawn: Callable[..., ServiceProcess],
    media_settings: MediaSettings,
    http: httpx.AsyncClient,
    tap: EventTap,
    videos: tuple[EncodedMedia, EncodedMedia],
    audios: tuple[EncodedMedia, EncodedMedia],
) -> None:
    """SIGKILL: nothing is announced; each client sees its inbound media stop and
    rejoins by itself with a grant for another node (signaling's answer, played by the
    test). The gap at each receiver, from the kill, is printed."""
    dying = spawn("media", MEDIA_NODE_ID=NODE)
    spare = spawn("media", MEDIA_NODE_ID="node-spare")
    alice, bob = MediaClient(videos[0], audios[0]), MediaClient(videos[0], audios[0])
    try:
        call_id = await start_call(dying, media_settings, http, alice, bob, tap)
        for client, user in ((alice, "alice"), (bob, "bob")):

            def grant(user: str = user) -> tuple[str, str]:
                token = media_token(media_settings, call_id, user, "node-spare")
                return sessions_url(spare, call_id), token

            client.auto_rejoin(http, stall_s=1.0, grant=grant)
        got = {c: c.received["video"].packets for c in (alice, bob)}
        killed_at = time.monotonic()
        dying.kill()
        await eventually(
            lambda: all(c.received["video"].packets >= got[c] + 60 for c in (alice, bob)),
            timeout=30,
        )
        assert all(c.rejoins and c.rejoins[0][1] is not None for c in (alice, bob))
        await eventually(
            lambda: [
                m
                for m in tap.of(EventType.CALL_MEDIA_CONNECTED, call_id)
                if m["node_id"] == "node-spare"
            ]
        )
        report = []
        for name, client in (("alice", alice), ("bob", bob)):
            for kind in ("video", "audio"):
                rejoined_at = client.rejoins[0][0]  # packets in flight at the kill aside
                first_after = next(
                    at for at, *_ in client.received[kind].arrivals if at > rejoined_at
                )
                report.append(f"{name} {kind} {(first_after - killed_at) * 1000:.0f} ms")
        print("\nSIGKILL, clients rejoin by themselves: media back after " + ", ".join(report))
    finally:
        await asyncio.gather(alice.close(), bob.close())


async def test_a_rejoin_that_never_connects_leaves_the_old_session_forwarding(
    spawn: Callable[..., ServiceProcess],
    media_settings: MediaSettings,
    http: httpx.AsyncClient,
    tap: EventTap,
    videos: tuple[EncodedMedia, EncodedMedia],
    audios: tuple[EncodedMedia, EncodedMedia],
) -> None:
    media = spawn("media", MEDIA_NODE_ID=NODE, MEDIA_ICE_TIMEOUT_S="2")
    alice, bob = MediaClient(videos[0], audios[0]), MediaClient(videos[0], audios[0])
    ghost = MediaClient(videos[1], audios[1])  # Alice's second offer: it never starts ICE
    try:
        call_id = await start_call(media, media_settings, http, alice, bob, tap)
        token = media_token(media_settings, call_id, "alice")
        offered = await ghost.connect(sessions_url(media, call_id), token, http, apply_answer=False)
        assert offered.status_code == 201, offered.text
        from_alice = ssrcs(alice)["video"]

        def bob_got_alices() -> int:
            sent = sent_by(alice, "video", from_alice)
            return sum(1 for _, p in bob.received["video"].payloads if p in sent)

        async def dropped() -> bool:  # past the ICE deadline the pending session is gone
            return await ghost.leave(http, media.url, token) == 404

        await eventually(dropped, timeout=15, step=0.5)
        got = bob_got_alices()
        # Alice's old session forwarded all along, and goes on.
        await eventually(lambda: bob_got_alices() >= got + 60, timeout=15)
        assert tap.of(EventType.CALL_MEDIA_FAILED, call_id) == []
        assert peer_events(tap, call_id) == []
    finally:
        await asyncio.gather(alice.close(), bob.close(), ghost.close())


async def test_a_room_for_a_moved_call_waits_the_rejoin_grace_for_the_other_party(
    spawn: Callable[..., ServiceProcess],
    media_settings: MediaSettings,
    http: httpx.AsyncClient,
    tap: EventTap,
    audios: tuple[EncodedMedia, EncodedMedia],
) -> None:
    """A new call's room fails after MEDIA_TIMEOUT_S without both parties' media; one
    opened by a moved call's grant waits the rejoin grace (the other party may still be
    leaving the drained node, or be offline for a moment)."""
    media = spawn("media", MEDIA_NODE_ID=NODE, MEDIA_TIMEOUT_S="2", MEDIA_REJOIN_GRACE_S="30")
    new_call, moved_call = uuid.uuid4().hex, uuid.uuid4().hex
    fresh, moved = MediaClient(None, audios[0]), MediaClient(None, audios[0])
    try:
        for client, call_id, grant in (
            (fresh, new_call, MediaGrant(new_call, "alice", NODE)),
            (moved, moved_call, MediaGrant(moved_call, "carol", NODE, moved=True)),
        ):
            token = issue_media_token(media_settings, grant)
            response = await client.connect(sessions_url(media, call_id), token, http)
            assert response.status_code == 201, response.text
        failed = await eventually(lambda: tap.of(EventType.CALL_MEDIA_FAILED, new_call), timeout=30)
        assert failed[0]["reason"] == "media_timeout"
        await asyncio.sleep(3.0)  # well past MEDIA_TIMEOUT_S for the moved call's room too
        assert tap.of(EventType.CALL_MEDIA_FAILED, moved_call) == []
    finally:
        await asyncio.gather(fresh.close(), moved.close())
