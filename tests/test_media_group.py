"""A group call's room end to end: a real media process, seven real aiortc participants,
the real broker (``call_participant_left``) and Redis.

Each participant sends its own pre-encoded VP8 (160x120) and Opus (noise: no two
participants' payloads are alike) and offers five recvonly slots besides its own pair; the
SFU says on the ``room`` data channel which user each slot carries. What arrives on a
slot must be byte for byte what that user sent (never decoded, never mixed up).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from services.media.settings import MediaSettings
from shared.auth import MediaGrant, issue_media_token
from shared.bus import Bus, Delivery, Scope
from shared.contracts import CallMediaConnected, CallParticipantLeft, Event
from tests.support.waiting import eventually
from tools.media_client import EncodedMedia, MediaClient, encode_opus, encode_vp8
from tools.stack import ServiceProcess

pytestmark = pytest.mark.e2e

NODE = "node-g"
GROUP = "g1"
MAX = 7
SLOTS = MAX - 2  # recvonly pairs besides the own pair: one slot per other participant


@pytest.fixture(scope="module")
def media() -> list[tuple[EncodedMedia, EncodedMedia]]:
    """Video and audio per participant, each its own noise."""
    return [
        (encode_vp8(160, 120, seconds=1.0, bitrate=150_000), encode_opus(0.6)) for _ in range(8)
    ]


@pytest.fixture
async def bus(media_settings: MediaSettings, redis_client: Redis) -> AsyncIterator[Bus]:
    seen: list[Event] = []

    async def record(event: Any, delivery: Delivery) -> None:
        seen.append(event)

    bus = Bus(media_settings, redis_client, "groupwatch")
    bus.subscribe("events", {CallMediaConnected: record}, scope=Scope.INSTANCE)
    await bus.start()
    bus.seen = seen  # type: ignore[attr-defined]
    yield bus
    await bus.close()


def grant(settings: MediaSettings, call_id: str, user: str, group: str | None = GROUP) -> str:
    return issue_media_token(settings, MediaGrant(call_id, user, NODE, group=group))


def identical(receiver: MediaClient, sender: MediaClient, user: str, kind: str) -> tuple[int, int]:
    """(packets that came on the slot carrying ``user``, of which ``sender`` sent)."""
    sent = set(sender.sent[kind].payloads)
    got = receiver.from_user(user, kind).payloads
    return len(got), sum(1 for item in got if item in sent)


def receives_all(
    client: MediaClient, others: list[str], counts: dict[str, tuple[int, int]] | None = None
) -> bool:
    """``client``'s slots carry exactly ``others``, and each one's audio and video came
    (more than ``counts[user]`` packets, when given: still coming)."""
    users = {u for u in client.slot_users().values() if u is not None}
    if users != set(others):
        return False
    for user in others:
        video = client.from_user(user, "video").packets
        audio = client.from_user(user, "audio").packets
        floor = counts.get(user, (0, 0)) if counts else (0, 0)
        if video <= floor[0] + 15 or audio <= floor[1] + 15:
            return False
    return True


async def test_six_participants_then_a_seventh_joins_and_a_third_leaves(
    spawn: Callable[..., ServiceProcess],
    media_settings: MediaSettings,
    bus: Bus,
    http: httpx.AsyncClient,
    media: list[tuple[EncodedMedia, EncodedMedia]],
) -> None:
    node = spawn("media", MEDIA_NODE_ID=NODE, GROUP_CALL_MAX_PARTICIPANTS=str(MAX))
    call_id = uuid.uuid4().hex
    url = f"{node.url}/v1/rooms/{call_id}/sessions"
    users = [f"u{i}" for i in range(1, 8)]
    clients = {
        user: MediaClient(video, audio, slots=SLOTS, light=True, audio_level=120)
        for user, (video, audio) in zip(users, media, strict=False)
    }
    tokens = {user: grant(media_settings, call_id, user) for user in users}
    clients["u2"].audio_level = 20  # u2 talks; the others are quiet (-120 dBov)
    extra: list[MediaClient] = []
    try:
        first_six = users[:6]
        for user in first_six:
            response = await clients[user].connect(url, tokens[user], http)
            assert response.status_code == 201, response.text
            assert response.text.count("m=video") == SLOTS + 1
            assert "ssrc-audio-level" in response.text  # negotiated: the speaker hint
            assert "m=application" in response.text  # the room channel

        # Each of the six receives the other five's audio and video, each in its slot.
        for user in first_six:
            others = [u for u in first_six if u != user]
            await eventually(partial(receives_all, clients[user], others), timeout=60)
        for receiver in first_six:
            for sender in first_six:
                if sender == receiver:
                    continue
                for kind in ("audio", "video"):
                    total, same = identical(clients[receiver], clients[sender], sender, kind)
                    assert total > 0 and same == total, (receiver, sender, kind, total, same)
        await eventually(lambda: any(e.call_id == call_id for e in bus.seen), timeout=20)  # type: ignore[attr-defined]

        # The active speaker: u2, on every channel and in the stats; then u4 takes over.
        await eventually(lambda: all(clients[u].speaker == "u2" for u in first_six), timeout=20)
        auth = {"Authorization": f"Bearer {tokens['u1']}"}
        stats = (await http.get(f"{node.url}/v1/rooms/{call_id}/stats", headers=auth)).json()
        assert stats["group"] == GROUP and stats["active_speaker"] == "u2"
        assert {p["user_id"] for p in stats["participants"]} == set(first_six)
        levels = {p["user_id"]: p["audio_level"] for p in stats["participants"]}
        assert levels["u2"] > 100 > levels["u1"] > 0, levels  # 127 - 20 vs 127 - 120
        clients["u2"].audio_level, clients["u4"].audio_level = 127, 10
        await eventually(lambda: all(clients[u].speaker == "u4" for u in first_six), timeout=20)

        # u1 can take 250 kbps for its five videos: 50 kbps each, and no publisher of
        # them is told more than that by the SFU (the minimum of its subscribers).
        async def publishers_capped() -> bool:
            await clients["u1"].send_remb(250_000)
            return all(
                any(bitrate <= 50_000 for bitrate in clients[u].rembs) for u in first_six[1:]
            )

        await eventually(publishers_capped, timeout=30, step=0.5)

        # A 1:1 call's grant does not open a session in a group room.
        probe = MediaClient(media[7][0], media[7][1], slots=SLOTS)
        extra.append(probe)
        refused = await probe.connect(url, grant(media_settings, call_id, "u8", group=None), http)
        assert refused.status_code == 403 and refused.json()["reason"] == "wrong_call"

        # A seventh joins: everyone gets its media in a free slot, and it gets theirs.
        counts = {
            user: {
                o: (clients[user].from_user(o, "video").packets, 0) for o in first_six if o != user
            }
            for user in first_six
        }
        assert (await clients["u7"].connect(url, tokens["u7"], http)).status_code == 201
        for user in users:
            others = [u for u in users if u != user]
            await eventually(partial(receives_all, clients[user], others, counts.get(user)), 60)
        # The room is full at GROUP_CALL_MAX_PARTICIPANTS.
        full = MediaClient(media[7][0], media[7][1], slots=SLOTS)
        extra.append(full)
        response = await full.connect(url, grant(media_settings, call_id, "u8"), http)
        assert response.status_code == 403 and response.json()["reason"] == "room_full"

        # u3 leaves the call: its session closes, the others keep receiving each other.
        await bus.publish(CallParticipantLeft(call_id=call_id, user="u3", group=GROUP))
        staying = [u for u in users if u != "u3"]

        async def u3_gone() -> bool:
            body = (await http.get(f"{node.url}/v1/rooms/{call_id}/stats", headers=auth)).json()
            return {p["user_id"] for p in body["participants"]} == set(staying)

        await eventually(u3_gone, timeout=20)
        counts = {
            user: {
                o: (
                    clients[user].from_user(o, "video").packets,
                    clients[user].from_user(o, "audio").packets,
                )
                for o in staying
                if o != user
            }
            for user in staying
        }
        for user in staying:
            others = [u for u in staying if u != user]
            await eventually(partial(receives_all, clients[user], others, counts[user]), 30)
            last = next(m for m in reversed(clients[user].messages) if m["type"] == "slots")
            assert "u3" not in last["participants"] and None in [s["user"] for s in last["slots"]]
        for receiver in staying:
            for sender in staying:
                if sender != receiver:
                    total, same = identical(clients[receiver], clients[sender], sender, "video")
                    assert total > 0 and same == total, (receiver, sender, total, same)

        # u3's grant from before the leave is refused; a fresh one (it joins again) is not.
        again = MediaClient(media[2][0], media[2][1], slots=SLOTS)
        extra.append(again)
        stale = await again.connect(url, tokens["u3"], http)
        assert stale.status_code == 403 and stale.json()["reason"] == "participant_left"
        rejoin = MediaClient(media[2][0], media[2][1], slots=SLOTS, light=True)
        extra.append(rejoin)
        fresh = await rejoin.connect(url, grant(media_settings, call_id, "u3"), http)
        assert fresh.status_code == 201, fresh.text
        await eventually(lambda: receives_all(rejoin, staying), timeout=60)
    finally:
        await asyncio.gather(*(c.close() for c in [*clients.values(), *extra]))
