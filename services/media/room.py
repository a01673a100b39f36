"""Rooms: one per call, two parties, each with one session (a peer connection).

A party's offer brings an audio and/or a video transceiver. What a party publishes is a
:class:`Publication` (the SFU's receiver, tapped: its packets are forwarded before aiortc
handles them, and never decoded); what it receives comes from a :class:`Forwarder` per
kind feeding the SFU's sender toward it. When the other party arrives, or comes back on a
new session, :meth:`Room.wire` points each forwarder at the other party's publication.

A party that rejoins (a new session while its old one is in the room) does so
make-before-break: the new session is *pending*, fed the other party's media at once,
while the old one keeps forwarding; the new session's first packet promotes it (the old
one is retired and closed). Each party's link is ``connected`` or ``reconnecting`` (its
packets stopped ``MEDIA_STALL_S``), see :meth:`Room.links_changed`.

A room's state only moves along :data:`TRANSITIONS`, through :meth:`Room.set_state`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from services.media import aiortc_internals as internals
from services.media.delays import DelayRecorder
from services.media.forwarder import KEYFRAME_DETECTORS, Forwarder
from services.media.sdp import announce_public_ip
from services.media.settings import MediaSettings
from shared.contracts import MediaFailure, PeerConnection

log = logging.getLogger(__name__)

REMB_FRESH_S = 5.0
KINDS = ("audio", "video")


class RoomState(StrEnum):
    WAITING = "waiting"
    """Open; not yet both parties' media flowing."""
    CONNECTED = "connected"
    """Both parties' media flows (call_media_connected was published)."""
    FAILED = "failed"
    """ICE failed or media stopped (call_media_failed was published)."""
    CLOSED = "closed"


TRANSITIONS: dict[RoomState, frozenset[RoomState]] = {
    RoomState.WAITING: frozenset({RoomState.CONNECTED, RoomState.FAILED, RoomState.CLOSED}),
    RoomState.CONNECTED: frozenset({RoomState.FAILED, RoomState.CLOSED}),
    RoomState.FAILED: frozenset({RoomState.CLOSED}),
    RoomState.CLOSED: frozenset(),
}


LINK_TRANSITIONS: dict[PeerConnection, frozenset[PeerConnection]] = {
    PeerConnection.CONNECTED: frozenset({PeerConnection.RECONNECTING}),
    PeerConnection.RECONNECTING: frozenset({PeerConnection.CONNECTED}),
}
"""A party's link (see :meth:`Room.set_link`): each change is one ``call_media_peer``."""


class CloseReason(StrEnum):
    CALL_ENDED = "call_ended"
    EMPTY = "empty"
    MEDIA_FAILED = "media_failed"
    MOVED = "moved"
    """Both parties left a draining node (their call moved): not the call's end."""
    SHUTDOWN = "shutdown"


class BadTransition(RuntimeError):
    pass


class NegotiationError(ValueError):
    """The offer cannot be answered; the message says why (it goes to the client)."""


class SilentTrack(MediaStreamTrack):
    """The sender's track: never yields a frame, so aiortc never encodes; the SFU sends
    forwarded packets itself."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def recv(self) -> Any:
        await self._never
        raise MediaStreamError

    def stop(self) -> None:
        if not self._never.done():
            self._never.cancel()
        super().stop()


def _media_codec(codecs: list[RTCRtpCodecParameters]) -> RTCRtpCodecParameters | None:
    return next((c for c in codecs if c.name.lower() != "rtx"), None)


def _same_codec(a: RTCRtpCodecParameters, b: RTCRtpCodecParameters) -> bool:
    if a.mimeType.lower() != b.mimeType.lower() or a.clockRate != b.clockRate:
        return False
    if a.mimeType.lower() == "video/h264":
        keys = ("packetization-mode", "profile-level-id")
        return all(
            str(a.parameters.get(k, "")).lower()[:4] == str(b.parameters.get(k, "")).lower()[:4]
            for k in keys
        )
    return True


def _with_rtx(
    codecs: list[RTCRtpCodecParameters], codec: RTCRtpCodecParameters
) -> list[RTCRtpCodecParameters]:
    rtx = [
        c
        for c in codecs
        if c.name.lower() == "rtx" and c.parameters.get("apt") == codec.payloadType
    ]
    return [codec, *rtx[:1]]


def payload_type_map(
    publisher: list[RTCRtpCodecParameters], subscriber: list[RTCRtpCodecParameters]
) -> dict[int, int]:
    """Publisher payload type -> the subscriber's payload type for the same codec."""
    mapping: dict[int, int] = {}
    for codec in publisher:
        if codec.name.lower() == "rtx":
            continue
        match = next(
            (c for c in subscriber if c.name.lower() != "rtx" and _same_codec(codec, c)), None
        )
        if match is not None and codec.payloadType is not None and match.payloadType is not None:
            mapping[codec.payloadType] = match.payloadType
    return mapping


@dataclass
class Publication:
    """What a party sends to the SFU, of one kind."""

    participant: Participant
    kind: str
    transceiver: RTCRtpTransceiver
    keyframe_interval_s: float
    spawn: Callable[[Coroutine[Any, Any, Any], str], None]
    media_ssrc: int | None = None
    decoder_stopped: bool = False
    targets: list[Forwarder] = field(default_factory=list)
    """The forwarders its packets go to (the other party's session(s)); set by wire()."""
    _last_keyframe_request: float = float("-inf")

    @property
    def receiver(self) -> RTCRtpReceiver:
        return self.transceiver.receiver

    @property
    def codecs(self) -> list[RTCRtpCodecParameters]:
        return internals.negotiated_codecs(self.transceiver)

    def request_keyframe(self) -> None:
        now = time.monotonic()
        if self.media_ssrc is None or now - self._last_keyframe_request < self.keyframe_interval_s:
            return
        self._last_keyframe_request = now
        self.participant.keyframes_requested += 1
        self.spawn(
            internals.send_pli(self.receiver, self.media_ssrc),
            f"pli-{self.participant.session_id}",
        )


@dataclass
class PartyLink:
    """How one party's media reaches the room, and since when (monotonic)."""

    connection: PeerConnection = PeerConnection.CONNECTED
    since: float = 0.0


@dataclass
class Participant:
    """One party's session (current, or pending while it rejoins)."""

    user_id: str
    session_id: str
    pc: RTCPeerConnection
    created_at: float = field(default_factory=time.monotonic)
    """When its offer came: the ICE deadline counts from here."""
    connected_at: float | None = None
    """When its connection (ICE, then DTLS) first reached ``connected``."""
    publications: dict[str, Publication] = field(default_factory=dict)
    outputs: dict[str, Forwarder] = field(default_factory=dict)
    packets_in: int = 0
    bytes_in: int = 0
    last_packet_at: float | None = None
    arrived_at: float = 0.0
    keyframes_requested: int = 0
    bitrate_in_bps: float = 0.0
    bitrate_out_bps: float = 0.0
    _rate_sample: tuple[float, int, int] | None = None

    @property
    def packets_out(self) -> int:
        return sum(f.counters.packets for f in self.outputs.values())

    @property
    def bytes_out(self) -> int:
        return sum(f.counters.bytes for f in self.outputs.values())

    def stamp_arrival(self) -> None:
        self.arrived_at = time.perf_counter()

    def sample_rates(self, now: float) -> None:
        bytes_out = self.bytes_out
        if self._rate_sample is not None:
            then, bin_, bout = self._rate_sample
            elapsed = now - then
            if elapsed > 0:
                self.bitrate_in_bps = (self.bytes_in - bin_) * 8 / elapsed
                self.bitrate_out_bps = (bytes_out - bout) * 8 / elapsed
        self._rate_sample = (now, self.bytes_in, bytes_out)


class Room:
    def __init__(self, call_id: str, settings: MediaSettings, delays: DelayRecorder) -> None:
        self.call_id = call_id
        self.settings = settings
        self.delays = delays
        self.parties: list[str] = []
        """The call's two parties, in order of arrival; nobody else is admitted."""
        self.participants: dict[str, Participant] = {}
        self.pending: dict[str, Participant] = {}
        """A rejoining party's new session, until its first packet promotes it."""
        self.links: dict[str, PartyLink] = {}
        self.retire: Callable[[Participant], None] = _keep
        """What becomes of a session replaced by a promoted one (Rooms closes it)."""
        self.state = RoomState.WAITING
        self.created_at = time.monotonic()
        self.waiting_timeout_s = settings.timeout_s
        """How long the room waits for both parties' media (MEDIA_TIMEOUT_S; the rejoin
        grace for a call moved here)."""
        self.lock = asyncio.Lock()

    # ------------------------------------------------------------------ state

    def set_state(self, new: RoomState) -> None:
        old = self.state
        if new not in TRANSITIONS[old]:
            raise BadTransition(f"room {self.call_id} is {old}; it cannot become {new}")
        self.state = new
        log.info("room %s: %s -> %s", self.call_id, old, new)

    @property
    def is_open(self) -> bool:
        return self.state in (RoomState.WAITING, RoomState.CONNECTED)

    def admits(self, user_id: str) -> bool:
        return user_id in self.parties or len(self.parties) < 2

    def peer_of(self, user_id: str) -> Participant | None:
        for uid, participant in self.participants.items():
            if uid != user_id:
                return participant
        return None

    def media_flowing(self) -> bool:
        """Both parties are here, and each one's media reaches the SFU and the other."""
        if len(self.participants) < 2:
            return False
        return all(p.packets_in > 0 and p.packets_out > 0 for p in self.participants.values())

    def ice_overdue(self, now: float, ice_timeout_s: float) -> Participant | None:
        """A session whose connection has not reached ``connected`` ``ice_timeout_s``
        after its offer came (ICE found no working pair, or DTLS never completed)."""
        for participant in self.participants.values():
            if participant.connected_at is None and now - participant.created_at > ice_timeout_s:
                return participant
        return None

    def stalled(self, now: float, timeout_s: float, ice_timeout_s: float) -> bool:
        """No media for ``timeout_s``: both parties' media not flowing that long after the
        room opened, or a connected party silent that long.

        A session still connecting (within its ICE deadline) is judged by that deadline,
        not here: it holds a waiting room's timeout off, for at most ``ice_timeout_s``
        more, so that a failure gets its real cause.
        """
        if self.state is RoomState.WAITING:
            age = now - self.created_at
            connecting = any(
                p.connected_at is None and now - p.created_at <= ice_timeout_s
                for p in self.participants.values()
            )
            return age > timeout_s + (ice_timeout_s if connecting else 0.0)
        return False  # a connected room: each party is judged by its link (links_changed)

    @staticmethod
    def _last_heard(participant: Participant) -> float:
        return participant.last_packet_at or participant.connected_at or participant.created_at

    def links_changed(self, now: float, stall_s: float) -> list[tuple[str, PeerConnection]]:
        """Move each party's link along (a connected room only): ``reconnecting`` once its
        packets stopped ``stall_s`` ago, ``connected`` when they flow again (on the same
        session or a new one). Returns the changes, in order."""
        changes: list[tuple[str, PeerConnection]] = []
        if self.state is not RoomState.CONNECTED:
            return changes
        for user_id, participant in self.participants.items():
            last = self._last_heard(participant)
            link = self.links.setdefault(user_id, PartyLink(since=now))
            silent = now - last > stall_s
            if silent and link.connection is PeerConnection.CONNECTED:
                self.set_link(user_id, PeerConnection.RECONNECTING, since=last)
            elif not silent and link.connection is PeerConnection.RECONNECTING:
                self.set_link(user_id, PeerConnection.CONNECTED, since=now)
            else:
                continue
            changes.append((user_id, self.links[user_id].connection))
        return changes

    def set_link(self, user_id: str, new: PeerConnection, since: float) -> None:
        old = self.links[user_id].connection
        if new not in LINK_TRANSITIONS[old]:
            raise BadTransition(f"{user_id}'s link in room {self.call_id} is {old}; not {new}")
        self.links[user_id] = PartyLink(new, since)
        log.info("room %s: %s's link %s -> %s", self.call_id, user_id, old, new)

    def gone_past(self, now: float, grace_s: float) -> str | None:
        """A party reconnecting for longer than ``grace_s`` (it did not come back)."""
        for user_id, link in self.links.items():
            if link.connection is PeerConnection.RECONNECTING and now - link.since > grace_s:
                if user_id in self.participants:
                    return user_id
        return None

    def abandoned(self, now: float, stall_s: float) -> bool:
        """Nobody's packets arrive any more (every party left or went silent): on a
        draining node, both parties moved elsewhere."""
        return all(now - self._last_heard(p) > stall_s for p in self.participants.values())

    def pending_overdue(self, now: float, ice_timeout_s: float) -> list[Participant]:
        """Rejoin sessions that brought no media within the ICE deadline, or failed."""
        return [
            p
            for p in self.pending.values()
            if now - p.created_at > ice_timeout_s
            or "failed" in (p.pc.connectionState, p.pc.iceConnectionState)
        ]

    # ------------------------------------------------------------------ sessions

    async def negotiate(
        self,
        user_id: str,
        offer_sdp: str,
        spawn: Callable[[Coroutine[Any, Any, Any], str], None],
        on_ice_failed: Callable[[], None],
    ) -> tuple[Participant, str]:
        """Answer ``user_id``'s offer with a new session (not yet in the room)."""
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        participant = Participant(user_id=user_id, session_id=uuid.uuid4().hex, pc=pc)
        try:
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            except Exception as exc:  # aiortc raises ValueError, KeyError, OperationError...
                raise NegotiationError(f"the SDP offer cannot be used: {exc}") from exc
            transceivers = pc.getTransceivers()
            kinds = [t.kind for t in transceivers]
            if not transceivers or sorted(set(kinds)) != sorted(kinds):
                raise NegotiationError(
                    "the offer must have one audio and/or one video transceiver, "
                    f"it has: {kinds or 'none'}"
                )
            peer = self.peer_of(user_id)
            for transceiver in transceivers:
                self._choose_codec(transceiver, peer)
                publication = Publication(
                    participant,
                    transceiver.kind,
                    transceiver,
                    self.settings.keyframe_interval_s,
                    spawn,
                )
                participant.publications[transceiver.kind] = publication
                self._tap_publication(publication)
                sender = pc.addTrack(SilentTrack(transceiver.kind))
                codec = _media_codec(publication.codecs)
                detector = (
                    KEYFRAME_DETECTORS.get(codec.mimeType.lower())
                    if codec is not None and transceiver.kind == "video"
                    else None
                )
                forwarder = Forwarder(
                    kind=transceiver.kind,
                    port=internals.SenderPort(sender),
                    payload_types={},
                    keyframe_detector=detector,
                    request_keyframe=_nothing,
                    delays=self.delays,
                )
                participant.outputs[transceiver.kind] = forwarder
                internals.tap_sender_rtcp(sender, self._subscriber_rtcp(forwarder))
            for transceiver in transceivers:
                internals.tap_arrival(transceiver.receiver.transport, participant.stamp_arrival)

            def _on_state() -> None:
                if pc.connectionState == "connected" and participant.connected_at is None:
                    participant.connected_at = time.monotonic()
                failed = "failed" in (pc.connectionState, pc.iceConnectionState)
                # A session that was replaced (or never joined) fails nobody's call; one
                # that did connect and then failed (ICE consent lost: the party's network
                # went away) is a silent party, which the rejoin grace judges.
                if (
                    failed
                    and participant.connected_at is None
                    and self.participants.get(user_id) is participant
                ):
                    log.warning(
                        "room %s: %s's session %s failed (connection %s, ICE %s)",
                        self.call_id,
                        user_id,
                        participant.session_id,
                        pc.connectionState,
                        pc.iceConnectionState,
                    )
                    on_ice_failed()

            pc.on("connectionstatechange", _on_state)
            pc.on("iceconnectionstatechange", _on_state)

            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
            local = pc.localDescription
            return participant, announce_public_ip(local.sdp, self.settings.public_ip)
        except BaseException:
            await pc.close()
            raise

    def _choose_codec(self, transceiver: RTCRtpTransceiver, peer: Participant | None) -> None:
        """One codec per kind, the same both ways: the other party's if it is here."""
        offered = internals.negotiated_codecs(transceiver)
        theirs = peer.publications.get(transceiver.kind) if peer else None
        target = _media_codec(theirs.codecs) if theirs else None
        if target is None:
            chosen = _media_codec(offered)
        else:
            chosen = next(
                (c for c in offered if c.name.lower() != "rtx" and _same_codec(c, target)), None
            )
            if chosen is None:
                raise NegotiationError(
                    f"the other party sends {target.mimeType}; this offer does not accept it"
                )
        if chosen is None:
            raise NegotiationError(f"no usable {transceiver.kind} codec in the offer")
        internals.force_codecs(transceiver, _with_rtx(offered, chosen))

    def _tap_publication(self, publication: Publication) -> None:
        participant = publication.participant
        receiver = publication.receiver
        kind = publication.kind
        codecs = internals.receiver_codecs(receiver)
        rtx_ssrcs = internals.receiver_rtx_ssrcs(receiver)
        participants = self.participants
        pending = self.pending
        user_id = participant.user_id

        def on_rtp(packet: internals.RtpPacket) -> Coroutine[Any, Any, None] | None:
            participant.packets_in += 1
            participant.bytes_in += len(packet.payload)
            participant.last_packet_at = time.monotonic()
            if not publication.decoder_stopped:
                internals.stop_decoder(receiver)
                publication.decoder_stopped = True
            codec = codecs.get(packet.payload_type)
            if codec is None:
                return None
            if codec.name == "rtx":
                apt = codec.parameters.get("apt")
                original_ssrc = rtx_ssrcs.get(packet.ssrc)
                if original_ssrc is None or len(packet.payload) < 2 or apt not in codecs:
                    return None
                packet = internals.unwrap_rtx(packet, payload_type=apt, ssrc=original_ssrc)  # type: ignore[arg-type]
            else:
                publication.media_ssrc = packet.ssrc
            if pending.get(user_id) is participant:
                self.promote(participant)
            targets = publication.targets  # none for a replaced session: media goes nowhere
            if not targets:
                return None
            if len(targets) == 1:
                return targets[0].forward(packet, participant.arrived_at)
            return _forward_each(targets, packet, participant.arrived_at)

        def on_rtcp(packet: Any) -> None:
            if participants.get(user_id) is not participant:
                return
            if isinstance(packet, internals.RtcpSrPacket) and packet.ssrc == publication.media_ssrc:
                info = packet.sender_info
                for forwarder in publication.targets:
                    rtp_timestamp = forwarder.out_timestamp(packet.ssrc, info.rtp_timestamp)
                    if rtp_timestamp is not None:
                        forwarder.port.set_sender_report(info.ntp_timestamp, rtp_timestamp)

        def cap_remb(packet: Any) -> Any:
            if (
                isinstance(packet, internals.RtcpPsfbPacket)
                and packet.fmt == internals.RTCP_PSFB_APP
            ):
                peer = self.peer_of(user_id)
                forwarder = peer.outputs.get(kind) if peer else None
                remb = forwarder.subscriber_remb if forwarder else None
                if remb is not None and time.monotonic() - remb[1] < REMB_FRESH_S:
                    try:
                        bitrate, ssrcs = internals.unpack_remb_fci(packet.fci)
                    except ValueError:
                        return packet
                    if remb[0] < bitrate:
                        packet.fci = internals.pack_remb_fci(remb[0], ssrcs)
            return packet

        internals.tap_receiver_rtp(receiver, on_rtp)
        internals.tap_receiver_rtcp(receiver, on_rtcp)
        internals.tap_receiver_outgoing_rtcp(receiver, cap_remb)

    @staticmethod
    def _subscriber_rtcp(forwarder: Forwarder) -> Callable[[Any], None]:
        def on_rtcp(packet: Any) -> None:
            if not isinstance(packet, internals.RtcpPsfbPacket):
                return
            if packet.fmt in (internals.RTCP_PSFB_PLI, internals.RTCP_PSFB_FIR):
                forwarder.request_keyframe()
            elif packet.fmt == internals.RTCP_PSFB_APP:
                try:
                    bitrate, _ = internals.unpack_remb_fci(packet.fci)
                except ValueError:
                    return
                forwarder.subscriber_remb = (bitrate, time.monotonic())

        return on_rtcp

    def join(self, participant: Participant) -> Participant | None:
        """Put a negotiated session in the room. A party already here rejoins: the new
        session is pending (fed at once, promoted by its first packet) and an earlier
        pending one is returned, to be closed."""
        user_id = participant.user_id
        if user_id not in self.parties:
            self.parties.append(user_id)
        if user_id not in self.participants:
            self.participants[user_id] = participant
            self.wire()
            return None
        earlier = self.pending.get(user_id)
        self.pending[user_id] = participant
        self.wire()
        # The other party's video is needed in the new session now, from a keyframe.
        peer = self.peer_of(user_id)
        video = peer.publications.get("video") if peer else None
        if video is not None:
            video.request_keyframe()
        return earlier

    def promote(self, participant: Participant) -> None:
        """A pending session's media arrived: it becomes the party's session."""
        user_id = participant.user_id
        if self.pending.get(user_id) is not participant:
            return
        del self.pending[user_id]
        old = self.participants.get(user_id)
        self.participants[user_id] = participant
        self.wire()
        log.info("room %s: %s moved to session %s", self.call_id, user_id, participant.session_id)
        if old is not None:
            self.retire(old)

    def drop_pending(self, participant: Participant) -> bool:
        if self.pending.get(participant.user_id) is not participant:
            return False
        del self.pending[participant.user_id]
        self.wire()
        return True

    def session(self, session_id: str) -> Participant | None:
        """A current or pending session of this room."""
        for participant in (*self.participants.values(), *self.pending.values()):
            if participant.session_id == session_id:
                return participant
        return None

    def leave(self, session_id: str) -> Participant | None:
        for sessions in (self.pending, self.participants):
            for uid, participant in list(sessions.items()):
                if participant.session_id == session_id:
                    del sessions[uid]
                    if sessions is self.participants and uid in self.pending:
                        self.participants[uid] = self.pending.pop(uid)  # its rejoin goes on
                    self.wire()
                    return participant
        return None

    def wire(self) -> None:
        """Point every forwarder at the other party's publication of its kind, and each
        publication at the forwarders it feeds (the other party's current session and,
        while it rejoins, its pending one)."""
        for session in (*self.participants.values(), *self.pending.values()):
            for published in session.publications.values():
                published.targets = []
        for subscriber in (*self.participants.values(), *self.pending.values()):
            publisher = self.peer_of(subscriber.user_id)
            for kind, forwarder in subscriber.outputs.items():
                publication = publisher.publications.get(kind) if publisher else None
                if publication is None:
                    forwarder.use_source({})
                    forwarder.source = None
                    forwarder.request_keyframe = _nothing
                    continue
                # Only a forwarder whose publication changed starts over (renumbers, and
                # for video waits for a keyframe): one party's rejoin leaves the other
                # direction, and the rejoiner's still-current session, untouched.
                if forwarder.source is not publication:
                    sender_codecs = internals.negotiated_codecs(
                        next(t for t in subscriber.pc.getTransceivers() if t.kind == kind)
                    )
                    codec = _media_codec(publication.codecs)
                    forwarder.use_source(
                        payload_type_map(publication.codecs, sender_codecs),
                        codec.clockRate if codec is not None else None,
                    )
                    forwarder.source = publication
                forwarder.request_keyframe = publication.request_keyframe
                if forwarder.payload_types:
                    publication.targets.append(forwarder)

    # ------------------------------------------------------------------ stats

    async def stats(self) -> dict[str, Any]:
        participants = []
        for participant in self.participants.values():
            participants.append(await _participant_stats(participant))
        return {
            "call_id": self.call_id,
            "node_id": self.settings.node_id,
            "state": self.state.value,
            "participants": participants,
        }

    async def close(self) -> None:
        sessions = [*self.participants.values(), *self.pending.values()]
        self.participants.clear()
        self.pending.clear()
        await asyncio.gather(*(p.pc.close() for p in sessions), return_exceptions=True)


def _nothing() -> None:
    return None


async def _forward_each(targets: list[Forwarder], packet: Any, arrived_at: float) -> None:
    for forwarder in list(targets):
        await forwarder.forward(packet, arrived_at)


def _keep(participant: Participant) -> None:
    """A room not run by :class:`Rooms` (unit tests) leaves a replaced session be."""


async def _participant_stats(participant: Participant) -> dict[str, Any]:
    report = await participant.pc.getStats()
    lost_in = received = 0
    lost_out = 0
    fraction_out: list[float] = []
    rtts: list[float] = []
    for stat in report.values():
        kind = getattr(stat, "type", "")
        if kind == "inbound-rtp":
            lost_in += max(stat.packetsLost, 0)
            received += stat.packetsReceived
        elif kind == "remote-inbound-rtp":
            lost_out += max(stat.packetsLost, 0)
            fraction_out.append(stat.fractionLost / 256)
            if stat.roundTripTime is not None:
                rtts.append(stat.roundTripTime)
    expected_in = received + lost_in
    return {
        "user_id": participant.user_id,
        "session_id": participant.session_id,
        "connection_state": participant.pc.connectionState,
        "packets_in": participant.packets_in,
        "bytes_in": participant.bytes_in,
        "packets_out": participant.packets_out,
        "bytes_out": participant.bytes_out,
        "packets_lost_in": lost_in,
        "packets_lost_out": lost_out,
        "loss_in": round(lost_in / expected_in, 4) if expected_in else 0.0,
        "loss_out": round(max(fraction_out), 4) if fraction_out else 0.0,
        "rtt_ms": round(max(rtts) * 1000, 1) if rtts else None,
        "bitrate_in_bps": round(participant.bitrate_in_bps),
        "bitrate_out_bps": round(participant.bitrate_out_bps),
        "keyframes_requested": participant.keyframes_requested,
    }


__all__ = [
    "CloseReason",
    "MediaFailure",
    "NegotiationError",
    "Participant",
    "Room",
    "RoomState",
]
