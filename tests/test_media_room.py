"""A room in-process (aiortc peer connections, no service, no broker): negotiation (one
codec per kind, the second party forced onto the first party's), and how the watchdog
tells an ICE failure from a media timeout."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Coroutine
from typing import Any

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender
from pydantic import ValidationError

from services.media.delays import DelayRecorder
from services.media.room import NegotiationError, Participant, Room, RoomState, payload_type_map
from services.media.settings import MediaSettings
from shared.contracts import PeerConnection
from tests.support import media

tasks = pytest.fixture(media.tasks)
peers = pytest.fixture(media.peers)


async def offer(peers: list[RTCPeerConnection], *video: str) -> str:
    """An offer with audio and video; ``video`` limits and orders the video codecs."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    peers.append(pc)
    pc.addTransceiver("audio")
    transceiver = pc.addTransceiver("video")
    if video:
        capabilities = RTCRtpSender.getCapabilities("video").codecs
        preferred = [c for name in video for c in capabilities if c.mimeType == f"video/{name}"]
        preferred += [c for c in capabilities if c.mimeType == "video/rtx"]
        transceiver.setCodecPreferences(preferred)
    await pc.setLocalDescription(await pc.createOffer())
    return pc.localDescription.sdp


def video_codecs(sdp: str) -> list[str]:
    section = sdp[sdp.index("m=video") :]
    return [name for name in re.findall(r"a=rtpmap:\d+ ([\w-]+)/", section) if name != "rtx"]


def make_room(call_id: str) -> Room:
    """A room opened at 100.0: the tests give the watchdog's checks their own ``now``."""
    room = Room(call_id, MediaSettings(environment="test"), DelayRecorder(window=16))
    room.created_at = 100.0
    return room


async def join(room: Room, user: str, sdp: str, tasks: list[asyncio.Future[Any]]) -> str:
    def spawn(coro: Coroutine[Any, Any, Any], name: str) -> None:
        tasks.append(asyncio.ensure_future(coro))

    participant, answer = await room.negotiate(user, sdp, spawn, on_ice_failed=lambda: None)
    room.join(participant)
    return answer


async def test_the_second_party_is_forced_onto_the_first_partys_codec(
    peers: list[RTCPeerConnection], tasks: list[asyncio.Future[Any]]
) -> None:
    room = make_room("c1")
    alice = await join(room, "alice", await offer(peers, "VP8", "H264"), tasks)
    assert video_codecs(alice) == ["VP8"]  # one codec: the first offered
    bob = await join(room, "bob", await offer(peers, "H264", "VP8"), tasks)
    assert video_codecs(bob) == ["VP8"]  # Bob prefers H.264, but Alice sends VP8
    forwarder = room.participants["bob"].outputs["video"]
    assert list(forwarder.payload_types) == [int(re.search(r"a=rtpmap:(\d+) VP8", alice)[1])]  # type: ignore[index]
    await room.close()


async def test_an_offer_without_the_other_partys_codec_is_refused(
    peers: list[RTCPeerConnection], tasks: list[asyncio.Future[Any]]
) -> None:
    room = make_room("c2")
    alice = await join(room, "alice", await offer(peers, "H264"), tasks)
    assert video_codecs(alice) == ["H264"]
    with pytest.raises(NegotiationError, match="H264"):
        await join(room, "bob", await offer(peers, "VP8"), tasks)
    assert set(room.participants) == {"alice"}
    await room.close()


def test_payload_types_follow_the_codec_not_the_number() -> None:
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters

    vp8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
    rtx = RTCRtpCodecParameters(
        mimeType="video/rtx", clockRate=90000, payloadType=97, parameters={"apt": 96}
    )
    theirs = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=120)
    assert payload_type_map([vp8, rtx], [theirs]) == {96: 120}


def at(room: Room, peers: list[RTCPeerConnection], user: str, created_at: float) -> Participant:
    """A session of ``user`` whose offer came at ``created_at`` (not connected yet)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    peers.append(pc)
    participant = Participant(user, uuid.uuid4().hex, pc, created_at=created_at)
    if user not in room.parties:
        room.parties.append(user)
    room.participants[user] = participant
    return participant


MEDIA_S, ICE_S = 15.0, 10.0
STALL_S, GRACE_S = 2.0, 30.0


async def test_a_session_not_connected_within_the_ice_deadline_is_overdue(
    peers: list[RTCPeerConnection],
) -> None:
    room = make_room("c4")
    alice = at(room, peers, "alice", 100.0)
    assert room.ice_overdue(109.9, ICE_S) is None
    assert not room.stalled(109.9, MEDIA_S, ICE_S)
    assert room.ice_overdue(110.1, ICE_S) is alice
    alice.connected_at = 101.0
    assert room.ice_overdue(110.1, ICE_S) is None
    # Connected, alone: nobody joins, so the media timeout (not ICE) ends it.
    assert not room.stalled(114.9, MEDIA_S, ICE_S)
    assert room.stalled(115.1, MEDIA_S, ICE_S)
    assert room.ice_overdue(115.1, ICE_S) is None


async def test_a_session_still_connecting_holds_the_media_timeout_off_for_a_while(
    peers: list[RTCPeerConnection],
) -> None:
    room = make_room("c5")
    at(room, peers, "alice", 100.0).connected_at = 100.5
    bob = at(room, peers, "bob", 112.0)  # joins late; his ICE never gets through
    assert not room.stalled(116.0, MEDIA_S, ICE_S)  # past 15 s, but bob's ICE decides
    assert room.ice_overdue(121.9, ICE_S) is None
    assert room.ice_overdue(122.1, ICE_S) is bob  # ice_failed, the watchdog's first check
    # Bob keeps offering anew: the room still fails, MEDIA_S + ICE_S after it opened.
    at(room, peers, "bob", 124.0)
    assert not room.stalled(124.9, MEDIA_S, ICE_S)
    assert room.stalled(125.1, MEDIA_S, ICE_S)


async def test_a_silent_party_is_reconnecting_then_connected_and_fails_only_past_the_grace(
    peers: list[RTCPeerConnection],
) -> None:
    room = make_room("c6")
    alice = at(room, peers, "alice", 100.0)
    alice.connected_at, alice.last_packet_at = 100.5, 101.0
    bob = at(room, peers, "bob", 101.0)
    bob.connected_at, bob.last_packet_at = 101.5, 102.0
    assert room.links_changed(102.0, STALL_S) == []  # waiting: nobody is judged yet
    room.set_state(RoomState.CONNECTED)
    assert not room.stalled(200.0, MEDIA_S, ICE_S)  # a connected room: links decide
    assert room.links_changed(102.5, STALL_S) == []
    alice.last_packet_at = 104.0
    assert room.links_changed(104.1, STALL_S) == [("bob", PeerConnection.RECONNECTING)]
    alice.last_packet_at = 109.5
    assert room.links_changed(110.0, STALL_S) == []  # said once
    assert room.gone_past(131.9, GRACE_S) is None  # silent since 102.0: within the grace
    alice.last_packet_at = bob.last_packet_at = 120.0  # he came back
    assert room.links_changed(120.1, STALL_S) == [("bob", PeerConnection.CONNECTED)]
    assert room.gone_past(140.0, GRACE_S) is None
    alice.last_packet_at = bob.last_packet_at = 150.0
    assert room.links_changed(150.1, STALL_S) == []
    assert room.links_changed(152.1, STALL_S) == [
        ("alice", PeerConnection.RECONNECTING),
        ("bob", PeerConnection.RECONNECTING),
    ]
    assert room.gone_past(179.9, GRACE_S) is None
    assert room.gone_past(180.1, GRACE_S) in ("alice", "bob")  # media_timeout
    assert room.abandoned(180.1, STALL_S)


@pytest.mark.parametrize("value", [0, 0.5, 121, -1])
def test_the_ice_deadline_is_bounded(value: float) -> None:
    with pytest.raises(ValidationError, match="ice_timeout_s"):
        MediaSettings(environment="test", ice_timeout_s=value)
    assert MediaSettings(environment="test").ice_timeout_s == 15.0
