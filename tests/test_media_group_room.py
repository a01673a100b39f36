"""A group call's room in-process (aiortc peer connections, no service, no broker): what a
group offer may hold (the own pair, recvonly slots), how participants are placed in each
other's slots (kept across changes, freed on leave, unplaced past the slots), leaving by
grant age, and the active speaker."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest
from aiortc import RTCBundlePolicy, RTCConfiguration, RTCPeerConnection

from services.media.delays import DelayRecorder
from services.media.room import NegotiationError, Participant, Room
from services.media.settings import MediaSettings
from tests.support import media

tasks = pytest.fixture(media.tasks)
peers = pytest.fixture(media.peers)


async def offer(peers: list[RTCPeerConnection], slots: int, *, sending_slot: bool = False) -> str:
    """The own pair (sendrecv), ``slots`` recvonly pairs and the room channel."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE))
    peers.append(pc)
    pc.addTransceiver("audio")
    pc.addTransceiver("video")
    for index in range(slots):
        direction = "sendrecv" if sending_slot and index == 0 else "recvonly"
        pc.addTransceiver("audio", direction=direction)
        pc.addTransceiver("video", direction="recvonly")
    pc.createDataChannel("room")
    await pc.setLocalDescription(await pc.createOffer())
    return str(pc.localDescription.sdp)


def group_room(call_id: str, most: int = 5) -> Room:
    settings = MediaSettings(environment="test", group_call_max_participants=most)
    return Room(call_id, settings, DelayRecorder(window=16), group="g1")


async def join(
    room: Room, user: str, sdp: str, tasks: list[asyncio.Future[Any]], issued_at: float = 0.0
) -> Participant:
    def spawn(coro: Coroutine[Any, Any, Any], name: str) -> None:
        tasks.append(asyncio.ensure_future(coro))

    participant, _ = await room.negotiate(
        user, sdp, spawn, on_ice_failed=lambda: None, grant_issued_at=issued_at
    )
    assert room.admits(user)
    room.join(participant)
    return participant


def placed(participant: Participant) -> list[str | None]:
    return [slot.user for slot in participant.slots]


async def test_a_group_offer_holds_the_own_pair_and_recvonly_slots_only(
    peers: list[RTCPeerConnection], tasks: list[asyncio.Future[Any]]
) -> None:
    room = group_room("g-offers", most=4)  # at most 2 recvonly pairs besides the own pair
    alice = await join(room, "alice", await offer(peers, 2), tasks)
    assert len(alice.slots) == 3 and set(alice.publications) == {"audio", "video"}
    mids = [(s.mid("audio"), s.mid("video")) for s in alice.slots]
    assert mids == [("0", "1"), ("2", "3"), ("4", "5")]  # the offer's own mids
    with pytest.raises(NegotiationError, match="at most 2"):
        await join(room, "bob", await offer(peers, 3), tasks)
    with pytest.raises(NegotiationError, match="recvonly"):
        await join(room, "bob", await offer(peers, 1, sending_slot=True), tasks)
    one_to_one = Room("c-1", MediaSettings(environment="test"), DelayRecorder(window=16))
    with pytest.raises(NegotiationError, match="one audio and/or one video"):
        await join(one_to_one, "bob", await offer(peers, 1), tasks)
    await asyncio.gather(room.close(), one_to_one.close())


async def test_participants_keep_their_slots_and_a_freed_slot_goes_to_the_unplaced(
    peers: list[RTCPeerConnection], tasks: list[asyncio.Future[Any]]
) -> None:
    room = group_room("g-slots")
    alice = await join(room, "alice", await offer(peers, 1), tasks)  # two slots: 0 and 1
    bob = await join(room, "bob", await offer(peers, 3), tasks)
    carol = await join(room, "carol", await offer(peers, 3), tasks)
    dave = await join(room, "dave", await offer(peers, 3), tasks)
    assert placed(alice) == ["bob", "carol"] and alice.unplaced == ["dave"]
    assert placed(dave) == ["alice", "bob", "carol", None]
    assert room.admits("erin") and len(room.present()) == 4
    # Every forwarder of a placed slot is fed by that participant's publication.
    for slot in dave.slots[:3]:
        for kind, forwarder in slot.forwarders.items():
            assert forwarder.source is room.participants[slot.user or ""].publications[kind]
    before = alice.slots[1].forwarders["video"]
    assert room.drop_user("bob") == [bob]
    assert placed(alice) == ["dave", "carol"] and alice.unplaced == []  # carol stays put
    assert alice.slots[1].forwarders["video"] is before  # her stream untouched
    assert placed(dave) == ["alice", None, "carol", None]
    assert "bob" not in room.parties and not any(
        f.source is not None and f.source in bob.publications.values() for f in carol.forwarders()
    )
    erin = await join(room, "erin", await offer(peers, 3), tasks)
    assert placed(dave) == ["alice", "erin", "carol", None]
    assert placed(erin) == ["alice", "carol", "dave", None]
    assert room.admits("frank")  # four here, five at most (room_full: test_media_group.py)
    await room.close()


async def test_a_leave_drops_only_sessions_from_grants_issued_before_it(
    peers: list[RTCPeerConnection], tasks: list[asyncio.Future[Any]]
) -> None:
    room = group_room("g-leave")
    await join(room, "alice", await offer(peers, 2), tasks, issued_at=1000.0)
    bob = await join(room, "bob", await offer(peers, 2), tasks, issued_at=1000.0)
    assert room.drop_user("bob", granted_before=999.0) == []  # a leave before his grant
    again = await join(room, "bob", await offer(peers, 2), tasks, issued_at=1010.0)
    assert room.pending["bob"] is again  # a rejoin, pending until its media comes
    # The leave at 1005 came late, after he joined again at 1010: only the old session goes.
    assert room.drop_user("bob", granted_before=1005.0) == [bob]
    assert room.participants["bob"] is again and not room.pending
    assert room.drop_user("bob", granted_before=1005.0) == []  # redelivered: nothing
    await room.close()


def test_the_active_speaker_is_the_loudest_and_changes_only_when_clearly_louder(
    peers: list[RTCPeerConnection],
) -> None:
    room = group_room("g-speaker")
    users = {}
    for user in ("alice", "bob", "carol"):
        session = Participant(user, user * 4, RTCPeerConnection())
        peers.append(session.pc)
        room.parties.append(user)
        room.participants[user] = session
        users[user] = session
    assert not room.pick_speaker(10.0) and room.speaker is None  # nobody spoke yet
    for _ in range(20):
        users["alice"].hear(30, 10.0)  # -30 dBov
        users["bob"].hear(100, 10.0)  # -100 dBov: under the threshold
    assert room.pick_speaker(10.0) and room.speaker == "alice"
    for _ in range(20):
        users["carol"].hear(27, 10.2)  # 3 dB louder than alice: not enough to switch
    assert not room.pick_speaker(10.2) and room.speaker == "alice"
    for _ in range(40):
        users["carol"].hear(15, 10.4)
    assert room.pick_speaker(10.4) and room.speaker == "carol"
    # carol falls silent (no levels for over a second): alice, still speaking, takes over.
    users["alice"].hear(30, 11.9)
    assert room.pick_speaker(11.9) and room.speaker == "alice"
    assert room.drop_user("alice") and room.speaker is None
