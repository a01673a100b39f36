"""A group call's continuity at the media node, for every participant: a real media
process, three aiortc participants, the real broker (a tap on the calls exchange), Redis.

- A participant's rejoin is make-before-break and keeps its slot in the others' sessions:
  their stream of it goes on (one SSRC, sequence numbers without a jump) with the new
  session's payloads.
- A participant whose packets stop is ``reconnecting``; past ``MEDIA_REJOIN_GRACE_S`` its
  session is dropped, the call does not fail, the others go on, and it can come back.
- SIGTERM: the node drains, forwarding on, until every participant has left it.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
import uuid
from collections.abc import Callable
from functools import partial

import httpx
import pytest

from services.media.settings import MediaSettings
from shared.auth import MediaGrant, issue_media_token
from shared.contracts import EventType
from tests.support.signaling import EventTap
from tests.support.waiting import eventually
from tools.media_client import EncodedMedia, Flow, MediaClient, encode_opus, encode_vp8
from tools.stack import ServiceProcess

pytestmark = pytest.mark.e2e

NODE = "node-gc"
USERS = ("u1", "u2", "u3")


@pytest.fixture(scope="module")
def media() -> list[tuple[EncodedMedia, EncodedMedia]]:
    """Each participant's own noise, and one more for u2's rejoined session."""
    return [
        (encode_vp8(160, 120, seconds=1.0, bitrate=150_000), encode_opus(0.6)) for _ in range(4)
    ]


def grant(settings: MediaSettings, call_id: str, user: str) -> str:
    return issue_media_token(settings, MediaGrant(call_id, user, NODE, group="g1"))


def receiving(client: MediaClient, others: list[str], more_than: int = 0) -> bool:
    users = {u for u in client.slot_users().values() if u is not None}
    return users == set(others) and all(
        client.from_user(o, "video").packets > more_than
        and client.from_user(o, "audio").packets > more_than
        for o in others
    )


def one_stream(flow: Flow) -> bool:
    """One SSRC, and each packet's sequence number the previous one's + 1 (or a few more:
    a loss), never a jump back or far ahead."""
    ssrcs = {ssrc for *_, ssrc in flow.arrivals}
    steps = [(b[1] - a[1]) & 0xFFFF for a, b in itertools.pairwise(flow.arrivals)]
    return len(ssrcs) == 1 and all(0 < step <= 5 for step in steps)


async def test_rejoin_grace_and_drain_for_every_participant(
    spawn: Callable[..., ServiceProcess],
    media_settings: MediaSettings,
    http: httpx.AsyncClient,
    tap: EventTap,
    media: list[tuple[EncodedMedia, EncodedMedia]],
) -> None:
    node = spawn(
        "media",
        MEDIA_NODE_ID=NODE,
        MEDIA_STALL_S="1",
        MEDIA_REJOIN_GRACE_S="2",
        MEDIA_DRAIN_S="120",
    )
    call_id = uuid.uuid4().hex
    url = f"{node.url}/v1/rooms/{call_id}/sessions"
    clients = {
        user: MediaClient(video, audio, slots=1, light=True)
        for user, (video, audio) in zip(USERS, media, strict=False)
    }
    back: list[MediaClient] = []
    try:
        for user, client in clients.items():
            assert (
                await client.connect(url, grant(media_settings, call_id, user), http)
            ).status_code == 201
        for user, client in clients.items():
            others = [u for u in USERS if u != user]
            await eventually(partial(receiving, client, others, 20), timeout=30)
        await eventually(lambda: tap.of(EventType.CALL_MEDIA_CONNECTED, call_id), timeout=15)

        # u2 rejoins (new session, new payloads): u1's slot of u2 goes on as one stream.
        u1, u2, u3 = clients["u1"], clients["u2"], clients["u3"]
        mid = u1.mid_of("u2", "video")
        old_payloads = {p for _, p in u2.sent["video"].payloads}
        new_video, new_audio = media[3]
        response = await u2.rejoin(
            url, grant(media_settings, call_id, "u2"), http, video=new_video, audio=new_audio
        )
        assert response.status_code == 201, response.text
        new_payloads: set[bytes] = set()

        def u1_gets_the_new_session() -> bool:
            got = {p for _, p in u1.by_mid[mid or ""].payloads}
            return bool(got & new_payloads) if new_payloads else False

        async def new_payloads_sent() -> bool:
            nonlocal new_payloads
            new_payloads = {p for _, p in u2.sent["video"].payloads} - old_payloads
            return bool(new_payloads)

        await eventually(new_payloads_sent, timeout=15)
        await eventually(u1_gets_the_new_session, timeout=20)
        assert u1.mid_of("u2", "video") == mid  # the same slot
        assert one_stream(u1.by_mid[mid or ""])
        assert tap.of(EventType.CALL_MEDIA_PEER, call_id) == []  # nobody was reconnecting

        # u3's network goes away: reconnecting, then past the grace its session is
        # dropped; the call does not fail and u1 and u2 go on.
        u3.go_offline()
        await eventually(
            lambda: [m for m in tap.of(EventType.CALL_MEDIA_PEER, call_id) if m["user"] == "u3"],
            timeout=10,
        )
        auth = {"Authorization": f"Bearer {grant(media_settings, call_id, 'u1')}"}

        async def u3_dropped() -> bool:
            body = (await http.get(f"{node.url}/v1/rooms/{call_id}/stats", headers=auth)).json()
            return {p["user_id"] for p in body.get("participants", [])} == {"u1", "u2"}

        await eventually(u3_dropped, timeout=15)
        assert tap.of(EventType.CALL_MEDIA_FAILED, call_id) == []
        counts = {c: c.received["video"].packets for c in (u1, u2)}
        await eventually(
            lambda: all(c.received["video"].packets > counts[c] + 30 for c in (u1, u2)), timeout=15
        )
        await eventually(
            lambda: all(receiving(c, [o]) for c, o in ((u1, "u2"), (u2, "u1"))), timeout=10
        )
        # ... and it comes back (a new session, its grant still valid).
        video, audio = media[2]
        again = MediaClient(video, audio, slots=1, light=True)
        back.append(again)
        assert (
            await again.connect(url, grant(media_settings, call_id, "u3"), http)
        ).status_code == 201
        await eventually(lambda: receiving(again, ["u1", "u2"], 10), timeout=30)
        await eventually(
            lambda: receiving(u1, ["u2", "u3"]) and u1.from_user("u3", "video").packets > 0,
            timeout=15,
        )

        # SIGTERM: the node forwards on until every participant has left it.
        assert node.proc is not None
        node.proc.send_signal(signal.SIGTERM)
        await eventually(
            lambda: [m for m in tap.messages if m["type"] == "media_node_draining"], timeout=10
        )
        await asyncio.gather(u1.close(), u2.close())
        # Once u1 and u2 have been silent past MEDIA_STALL_S (u3 hears nobody), u3 still
        # sends: the node does not exit.
        await eventually(
            lambda: time.monotonic() - (again.received["video"].last_at or 0.0) > 2.5,
            timeout=10,
            step=0.2,
        )
        assert node.proc.poll() is None
        await again.close()
        await eventually(
            lambda: node.proc is not None and node.proc.poll() is not None, timeout=20, step=0.2
        )
        assert node.proc.returncode == 0
        assert tap.of(EventType.CALL_MEDIA_FAILED, call_id) == []
    finally:
        await asyncio.gather(*(c.close() for c in [*clients.values(), *back]))
