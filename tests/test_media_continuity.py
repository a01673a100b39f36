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
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from services.media.forwarder import is_vp8_keyframe_start
from services.media.settings import MediaSettings
from shared.auth import MediaGrant, issue_media_token
from shared.contracts import EventType
from shared.media_registry import MediaNode, MediaRegistry
from tests.support.media import clients as open_clients
from tests.support.media import encoded_audio, encoded_video, media_token, sessions_url
from tests.support.signaling import EventTap
from tests.support.waiting import eventually
from tools.media_client import EncodedMedia, MediaClient
from tools.stack import ServiceProcess

pytestmark = pytest.mark.e2e

NODE = "node-live"


@pytest.fixture(scope="module")
def videos() -> tuple[EncodedMedia, EncodedMedia]:
    """Two encodings of the same size: a rejoined session's packets are told apart by
    their payloads (the noise differs)."""
    return encoded_video(), encoded_video()


@pytest.fixture(scope="module")
def audios() -> tuple[EncodedMedia, EncodedMedia]:
    return encoded_audio(), encoded_audio()


@dataclass
class Live:
    """One test's media nodes, its parties (closed after it) and the events they publish."""

    spawn: Callable[..., ServiceProcess]
    settings: MediaSettings
    http: httpx.AsyncClient
    tap: EventTap
    client: Callable[..., MediaClient]
    videos: tuple[EncodedMedia, EncodedMedia]
    audios: tuple[EncodedMedia, EncodedMedia]

    def node(self, node_id: str = NODE, **env: str) -> ServiceProcess:
        return self.spawn("media", MEDIA_NODE_ID=node_id, **env)

    def party(self, encoding: int = 0) -> MediaClient:
        return self.client(self.videos[encoding], self.audios[encoding])

    def grant(self, node: ServiceProcess, call_id: str, user: str) -> tuple[str, str]:
        """The URL and token ``user`` joins ``call_id``'s room on ``node`` with."""
        token = media_token(self.settings, call_id, user, node.env["MEDIA_NODE_ID"])
        return sessions_url(node, call_id), token

    async def rejoin(
        self, client: MediaClient, node: ServiceProcess, call_id: str, user: str, **media: Any
    ) -> httpx.Response:
        return await client.rejoin(*self.grant(node, call_id, user), self.http, **media)

    async def start_call(self, node: ServiceProcess) -> tuple[str, MediaClient, MediaClient]:
        """Alice and Bob in a room on ``node``, media flowing both ways,
        call_media_connected published."""
        call_id = uuid.uuid4().hex
        alice, bob = self.party(), self.party()
        for client, user in ((alice, "alice"), (bob, "bob")):
            response = await client.connect(*self.grant(node, call_id, user), self.http)
            assert response.status_code == 201, response.text
        await eventually(
            lambda: all(c.received["video"].packets >= 30 for c in (alice, bob)), timeout=30
        )
        await eventually(lambda: self.tap.of(EventType.CALL_MEDIA_CONNECTED, call_id), timeout=15)
        return call_id, alice, bob

    async def goes_offline(self, client: MediaClient, call_id: str) -> None:
        """``client``'s network goes away (nothing closes, nothing arrives) until the
        node says it is reconnecting."""
        client.go_offline()
        await eventually(lambda: self.peer_events(call_id), timeout=15)

    def peer_events(self, call_id: str) -> list[tuple[str, str]]:
        events = self.tap.of(EventType.CALL_MEDIA_PEER, call_id)
        return [(m["user"], m["connection"]) for m in events]

    def failed(self, call_id: str) -> list[dict[str, Any]]:
        return self.tap.of(EventType.CALL_MEDIA_FAILED, call_id)

    def connected_on(self, call_id: str, node_id: str) -> list[dict[str, Any]]:
        events = self.tap.of(EventType.CALL_MEDIA_CONNECTED, call_id)
        return [m for m in events if m["node_id"] == node_id]

    async def drain_announced(self) -> list[dict[str, Any]]:
        return await eventually(
            lambda: [m for m in self.tap.messages if m["type"] == "media_node_draining"],
            timeout=10,
        )


clients = pytest.fixture(open_clients)


@pytest.fixture
def live(
    spawn: Callable[..., ServiceProcess],
    media_settings: MediaSettings,
    http: httpx.AsyncClient,
    tap: EventTap,
    clients: Callable[..., MediaClient],
    videos: tuple[EncodedMedia, EncodedMedia],
    audios: tuple[EncodedMedia, EncodedMedia],
) -> Live:
    return Live(spawn, media_settings, http, tap, clients, videos, audios)


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
    live: Live,
) -> None:
    media = live.node()
    call_id, alice, bob = await live.start_call(media)
    old = ssrcs(alice)
    bob_keyframe_requests = bob.keyframe_requests
    alice_got = alice.received["video"].packets
    started = time.monotonic()
    rejoined = await live.rejoin(
        alice, media, call_id, "alice", video=live.videos[1], audio=live.audios[1]
    )
    assert rejoined.status_code == 201, rejoined.text
    new = ssrcs(alice)
    assert alice.rejoins[0][1] is not None  # the new connection carried media...
    assert alice.retired[0].connectionState == "closed"  # ...then the old one closed

    async def flowing_again() -> bool:
        got = bob.received["video"].payloads
        fresh = sent_by(alice, "video", new["video"])
        both_ways = alice.received["video"].packets >= alice_got + 30  # Bob's, on the new pc
        return both_ways and sum(1 for _, p in got if p in fresh) >= 60

    # Both directions, each at its own pace: Alice's new stream reaching Bob says nothing
    # of when Bob's 30th packet reaches Alice's new connection.
    await eventually(flowing_again, timeout=30)
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
    assert live.peer_events(call_id) == []  # nobody's media stopped
    assert live.failed(call_id) == []


async def test_a_party_whose_packets_stop_is_reconnecting_then_connected_after_it_rejoins(
    live: Live,
) -> None:
    media = live.node(MEDIA_STALL_S="1", MEDIA_REJOIN_GRACE_S="30")
    call_id, alice, bob = await live.start_call(media)
    await live.goes_offline(alice, call_id)
    await asyncio.sleep(2)  # silent on: still reconnecting, said once
    assert live.peer_events(call_id) == [("alice", "reconnecting")]
    event = live.tap.of(EventType.CALL_MEDIA_PEER, call_id)[0]
    assert event["node_id"] == NODE
    alice.go_offline(False)
    rejoined = await live.rejoin(alice, media, call_id, "alice")
    assert rejoined.status_code == 201, rejoined.text
    await eventually(lambda: len(live.peer_events(call_id)) >= 2, timeout=15)
    assert live.peer_events(call_id) == [("alice", "reconnecting"), ("alice", "connected")]
    bob_got = bob.received["video"].packets
    await eventually(lambda: bob.received["video"].packets >= bob_got + 30, timeout=15)
    assert live.failed(call_id) == []


async def test_a_party_gone_longer_than_the_rejoin_grace_fails_the_call_with_media_timeout(
    live: Live,
) -> None:
    media = live.node(MEDIA_STALL_S="1", MEDIA_REJOIN_GRACE_S="3")
    call_id, alice, _ = await live.start_call(media)
    await live.goes_offline(alice, call_id)
    # Reconnecting is not the end: within the grace the call has not failed.
    assert live.failed(call_id) == []
    failed = await eventually(lambda: live.failed(call_id), timeout=20)
    assert len(failed) == 1 and failed[0]["reason"] == "media_timeout", failed
    assert failed[0]["node_id"] == NODE
    assert live.peer_events(call_id) == [("alice", "reconnecting")]
    # The room is gone, and the call is remembered as over: no rejoin reopens it.
    alice.go_offline(False)
    again = await live.rejoin(alice, media, call_id, "alice")
    assert again.status_code == 409 and again.json()["reason"] == "call_ended"


async def node_in_registry(registry: MediaRegistry, node_id: str) -> MediaNode | None:
    return next((n for n in await registry.live_nodes() if n.node_id == node_id), None)


async def exited(proc: ServiceProcess, timeout: float) -> int:
    """The media node's exit code once it exits; if it does not within ``timeout``, its
    asyncio tasks (SIGUSR1 makes it log them) are in the failure's message."""
    assert proc.proc is not None
    popen = proc.proc
    try:
        await eventually(lambda: popen.poll() is not None, timeout=timeout, step=0.2)
    except AssertionError as stuck:
        popen.send_signal(signal.SIGUSR1)
        await asyncio.sleep(1.0)
        log = proc.log_path.read_text(errors="replace") if proc.log_path else ""
        raise AssertionError(
            f"the node did not exit in {timeout}s; its log:\n{log[-6000:]}"
        ) from stuck
    return int(popen.returncode)


async def test_sigterm_drains_the_node_it_forwards_on_refuses_new_sessions_and_exits_when_empty(
    live: Live, redis_client: Redis
) -> None:
    # The drain deadline is far: only the parties leaving can end this drain soon.
    media = live.node(MEDIA_STALL_S="1", MEDIA_DRAIN_S="120")
    registry = MediaRegistry(redis_client, live.settings)
    call_id, alice, bob = await live.start_call(media)
    node = await eventually(lambda: node_in_registry(registry, NODE))
    assert not node.draining
    assert media.proc is not None
    media.proc.send_signal(signal.SIGTERM)

    async def draining() -> bool:
        found = await node_in_registry(registry, NODE)
        return found is not None and found.draining

    await eventually(draining, timeout=10)
    announced = await live.drain_announced()
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
    refused = await live.party().connect(*live.grant(media, other, "carol"), live.http)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"] == "node_draining"
    assert refused.json()["reason"] == "node_draining"
    rejoin = await live.rejoin(alice, media, call_id, "alice")
    assert rejoin.status_code == 503 and rejoin.json()["error"] == "node_draining"
    assert media.proc.poll() is None  # still serving its call
    metrics = (await live.http.get(f"{media.url}/metrics")).text
    assert f'dmcall_media_draining{{node_id="{NODE}"}} 1.0' in metrics

    # Both parties move elsewhere (their connections here close): the node exits.
    await asyncio.gather(alice.close(), bob.close())
    assert await exited(media, timeout=20) == 0
    assert await node_in_registry(registry, NODE) is None
    # A draining node's calls are moving: it reported no failure, no reconnecting.
    assert live.failed(call_id) == []
    assert live.peer_events(call_id) == []


async def test_a_draining_node_exits_after_media_drain_s_when_its_parties_never_leave(
    live: Live, redis_client: Redis
) -> None:
    media = live.node(MEDIA_DRAIN_S="3")
    call_id, _, bob = await live.start_call(media)
    assert media.proc is not None
    media.proc.send_signal(signal.SIGTERM)
    await live.drain_announced()
    got = bob.received["video"].packets
    assert await exited(media, timeout=20) == 0  # the parties are still sending
    assert bob.received["video"].packets > got  # it forwarded until it left
    assert await node_in_registry(MediaRegistry(redis_client, live.settings), NODE) is None
    assert live.failed(call_id) == []


async def test_both_parties_move_from_a_draining_node_to_another_and_media_flows_again(
    live: Live,
) -> None:
    """What a rolling deploy does to a call (signaling's part, the grants for the new
    node, is played by the test): the media gap at each receiver is printed."""
    old_node = live.node(MEDIA_STALL_S="1")
    new_node = live.node("node-next")
    call_id, alice, bob = await live.start_call(old_node)
    assert old_node.proc is not None
    old_node.proc.send_signal(signal.SIGTERM)
    await live.drain_announced()
    moved_at = time.monotonic()
    got = {c: c.received["video"].packets for c in (alice, bob)}
    answers = await asyncio.gather(
        *(
            live.rejoin(client, new_node, call_id, user)
            for client, user in ((alice, "alice"), (bob, "bob"))
        )
    )
    assert [a.status_code for a in answers] == [201, 201], [a.text for a in answers]
    await eventually(
        lambda: all(c.received["video"].packets >= got[c] + 60 for c in (alice, bob)),
        timeout=20,
    )
    connected = await eventually(lambda: live.connected_on(call_id, "node-next"))
    assert len(connected) == 1
    assert await exited(old_node, timeout=20) == 0  # both left it: it exits by itself
    report = []
    for name, client in (("alice", alice), ("bob", bob)):
        for kind in ("video", "audio"):
            gap = client.received[kind].largest_gap(moved_at - 1.0)
            assert gap is not None
            report.append(f"{name} {kind} {gap * 1000:.0f} ms")
    print("\nmove to another node, media gap at each receiver: " + ", ".join(report))
    assert live.failed(call_id) == []


async def test_clients_rejoin_by_themselves_when_their_node_dies(live: Live) -> None:
    """SIGKILL: nothing is announced; each client sees its inbound media stop and
    rejoins by itself with a grant for another node (signaling's answer, played by the
    test). The gap at each receiver, from the kill, is printed."""
    dying = live.node()
    spare = live.node("node-spare")
    call_id, alice, bob = await live.start_call(dying)
    for client, user in ((alice, "alice"), (bob, "bob")):

        def grant(user: str = user) -> tuple[str, str]:
            return live.grant(spare, call_id, user)

        client.auto_rejoin(live.http, stall_s=1.0, grant=grant)
    got = {c: c.received["video"].packets for c in (alice, bob)}
    killed_at = time.monotonic()
    dying.kill()
    await eventually(
        lambda: all(c.received["video"].packets >= got[c] + 60 for c in (alice, bob)),
        timeout=30,
    )
    assert all(c.rejoins and c.rejoins[0][1] is not None for c in (alice, bob))
    await eventually(lambda: live.connected_on(call_id, "node-spare"))
    report = []
    for name, client in (("alice", alice), ("bob", bob)):
        for kind in ("video", "audio"):
            rejoined_at = client.rejoins[0][0]  # packets in flight at the kill aside
            first_after = next(at for at, *_ in client.received[kind].arrivals if at > rejoined_at)
            report.append(f"{name} {kind} {(first_after - killed_at) * 1000:.0f} ms")
    print("\nSIGKILL, clients rejoin by themselves: media back after " + ", ".join(report))


async def test_a_rejoin_that_never_connects_leaves_the_old_session_forwarding(
    live: Live,
) -> None:
    media = live.node(MEDIA_ICE_TIMEOUT_S="2")
    call_id, alice, bob = await live.start_call(media)
    ghost = live.party(1)  # Alice's second offer: it never starts ICE
    url, token = live.grant(media, call_id, "alice")
    offered = await ghost.connect(url, token, live.http, apply_answer=False)
    assert offered.status_code == 201, offered.text
    from_alice = ssrcs(alice)["video"]

    def bob_got_alices() -> int:
        sent = sent_by(alice, "video", from_alice)
        return sum(1 for _, p in bob.received["video"].payloads if p in sent)

    async def dropped() -> bool:  # past the ICE deadline the pending session is gone
        return await ghost.leave(live.http, media.url, token) == 404

    await eventually(dropped, timeout=15, step=0.5)
    got = bob_got_alices()
    # Alice's old session forwarded all along, and goes on.
    await eventually(lambda: bob_got_alices() >= got + 60, timeout=15)
    assert live.failed(call_id) == []
    assert live.peer_events(call_id) == []


async def test_a_room_for_a_moved_call_waits_the_rejoin_grace_for_the_other_party(
    live: Live,
) -> None:
    """A new call's room fails after MEDIA_TIMEOUT_S without both parties' media; one
    opened by a moved call's grant waits the rejoin grace (the other party may still be
    leaving the drained node, or be offline for a moment)."""
    media = live.node(MEDIA_TIMEOUT_S="2", MEDIA_REJOIN_GRACE_S="30")
    new_call, moved_call = uuid.uuid4().hex, uuid.uuid4().hex
    for call_id, grant in (
        (new_call, MediaGrant(new_call, "alice", NODE)),
        (moved_call, MediaGrant(moved_call, "carol", NODE, moved=True)),
    ):
        token = issue_media_token(live.settings, grant)
        response = await live.client(None, live.audios[0]).connect(
            sessions_url(media, call_id), token, live.http
        )
        assert response.status_code == 201, response.text
    failed = await eventually(lambda: live.failed(new_call), timeout=30)
    assert failed[0]["reason"] == "media_timeout"
    await asyncio.sleep(3.0)  # well past MEDIA_TIMEOUT_S for the moved call's room too
    assert live.failed(moved_call) == []
