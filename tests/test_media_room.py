"""Negotiation in a room, in-process (aiortc peer connections, no service, no broker):
one codec per kind, and the second party is forced onto the first party's."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender

from services.media.delays import DelayRecorder
from services.media.room import NegotiationError, Room, payload_type_map
from services.media.settings import MediaSettings


@pytest.fixture
async def tasks() -> AsyncIterator[list[asyncio.Future[Any]]]:
    started: list[asyncio.Future[Any]] = []
    yield started
    for task in started:
        task.cancel()
    await asyncio.gather(*started, return_exceptions=True)


@pytest.fixture
async def peers() -> AsyncIterator[list[RTCPeerConnection]]:
    made: list[RTCPeerConnection] = []
    yield made
    await asyncio.gather(*(pc.close() for pc in made))


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
    return Room(call_id, MediaSettings(environment="test"), DelayRecorder(window=16))


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
