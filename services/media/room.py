"""Rooms: one per call, its participants (two in a 1:1 call, up to
GROUP_CALL_MAX_PARTICIPANTS in a group call), each with one session (a peer connection).

A participant's offer brings its own pair (the first audio and the first video
transceiver) and, in a group call, further recvonly audio+video pairs: *slots*. What a
participant publishes on its own pair is a :class:`Publication` (the SFU's receiver,
tapped: its packets are forwarded before aiortc handles them, and never decoded); what it
receives comes through its :class:`Slot` s (slot 0 is the own pair), one
:class:`Forwarder` per kind each, feeding the SFU's sender toward it. :meth:`Room.wire`
places every other participant in one of a subscriber's slots (keyed by user: a
publisher keeps its slot across its rejoins) and points each forwarder at the placed
participant's publication. Who is in which slot, and the active speaker, go to the
client on its ``room`` data channel (docs/media.md).

A participant that rejoins (a new session while its old one is in the room) does so
make-before-break: the new session is *pending*, fed the others' media at once, while the
old one keeps forwarding; the new session's first packet promotes it (the old one is
retired and closed). Each participant's link is ``connected`` or ``reconnecting`` (its
packets stopped ``MEDIA_STALL_S``), see :meth:`Room.links_changed`.

A room's state only moves along :data:`TRANSITIONS`, through :meth:`Room.set_state`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from aiortc import (
    MediaStreamTrack,
    RTCBundlePolicy,
    RTCConfiguration,
    RTCDataChannel,
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
ROOM_CHANNEL = "room"
"""The label of the data channel a client opens for the room's messages (slots, speaker)."""

SPEAKER_HEARD_S = 1.0
"""A publisher whose last audio level is older than this is not speaking."""
SPEAKER_MIN_LOUDNESS = 127 - 60
"""Louder than -60 dBov (smoothed) to be the active speaker."""
SPEAKER_SWITCH_DB = 6.0
"""A new speaker must be this much louder than a current one who still speaks."""
LEVEL_WEIGHT = 0.1
"""Per audio packet, the weight of its level in the smoothed loudness (~200 ms at 50/s)."""


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
    """What a participant sends to the SFU, of one kind (on its own pair)."""

    participant: Participant
    kind: str
    transceiver: RTCRtpTransceiver
    keyframe_interval_s: float
    spawn: Callable[[Coroutine[Any, Any, Any], str], None]
    media_ssrc: int | None = None
    decoder_stopped: bool = False
    targets: list[Forwarder] = field(default_factory=list)
    """The forwarders its packets go to (the others' sessions' slots); set by wire()."""
    _last_keyframe_request: float = float("-inf")

    @property
    def receiver(self) -> RTCRtpReceiver:
        return self.transceiver.receiver

    @property
    def codecs(self) -> list[RTCRtpCodecParameters]:
        return internals.negotiated_codecs(self.transceiver)

    def subscribers_remb(self, now: float) -> int | None:
        """The lowest fresh REMB share of the subscribers this publication feeds: what
        the publisher may send so that every one of them can take it."""
        shares = [
            f.subscriber_remb[0]
            for f in self.targets
            if f.subscriber_remb is not None and now - f.subscriber_remb[1] < REMB_FRESH_S
        ]
        return min(shares) if shares else None

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
    """How one participant's media reaches the room, and since when (monotonic)."""

    connection: PeerConnection = PeerConnection.CONNECTED
    since: float = 0.0


@dataclass
class Slot:
    """One audio+video pair of a subscriber's session that carries one other participant."""

    index: int
    forwarders: dict[str, Forwarder] = field(default_factory=dict)
    transceivers: dict[str, RTCRtpTransceiver] = field(default_factory=dict)
    user: str | None = None
    """The participant whose media this slot carries now; None: free."""

    def mid(self, kind: str) -> str | None:
        transceiver = self.transceivers.get(kind)
        return transceiver.mid if transceiver is not None else None


@dataclass
class Participant:
    """One participant's session (current, or pending while it rejoins)."""

    user_id: str
    session_id: str
    pc: RTCPeerConnection
    created_at: float = field(default_factory=time.monotonic)
    """When its offer came: the ICE deadline counts from here."""
    connected_at: float | None = None
    """When its connection (ICE, then DTLS) first reached ``connected``."""
    grant_issued_at: float | None = None
    """The ``iat`` of the grant this session was opened with (Unix seconds)."""
    publications: dict[str, Publication] = field(default_factory=dict)
    slots: list[Slot] = field(default_factory=list)
    """Slot 0 is the own pair; further ones are the offer's recvonly pairs."""
    unplaced: list[str] = field(default_factory=list)
    """Other participants in no slot of this session (it has too few)."""
    channel: RTCDataChannel | None = None
    """The client's ``room`` data channel, once it opened."""
    packets_in: int = 0
    bytes_in: int = 0
    last_packet_at: float | None = None
    arrived_at: float = 0.0
    keyframes_requested: int = 0
    bitrate_in_bps: float = 0.0
    bitrate_out_bps: float = 0.0
    loudness: float | None = None
    """Smoothed loudness of its audio (127 - RFC 6464 level: dB above -127 dBov)."""
    loudness_at: float = float("-inf")
    _rate_sample: tuple[float, int, int] | None = None
    _told: dict[str, str] = field(default_factory=dict)
    """The last message of each type sent on its channel (sent again only if changed)."""

    @property
    def outputs(self) -> dict[str, Forwarder]:
        """Slot 0's forwarders (the own pair), by kind: all a 1:1 session has."""
        return self.slots[0].forwarders if self.slots else {}

    def forwarders(self) -> list[Forwarder]:
        return [f for slot in self.slots for f in slot.forwarders.values()]

    @property
    def packets_out(self) -> int:
        return sum(f.counters.packets for f in self.forwarders())

    @property
    def bytes_out(self) -> int:
        return sum(f.counters.bytes for f in self.forwarders())

    def stamp_arrival(self) -> None:
        self.arrived_at = time.perf_counter()

    def hear(self, level: int, now: float) -> None:
        """One audio packet's ``ssrc-audio-level`` (0 loudest, 127 silence)."""
        loudness = 127 - level
        previous = self.loudness
        self.loudness = (
            loudness if previous is None else previous + LEVEL_WEIGHT * (loudness - previous)
        )
        self.loudness_at = now

    def speaking(self, now: float) -> bool:
        return (
            self.loudness is not None
            and now - self.loudness_at <= SPEAKER_HEARD_S
            and self.loudness >= SPEAKER_MIN_LOUDNESS
        )

    def tell(self, message: dict[str, Any]) -> None:
        """Send ``message`` on the room channel, unless the last of its type said the same."""
        channel = self.channel
        if channel is None or channel.readyState != "open":
            return
        text = json.dumps(message, separators=(",", ":"))
        kind = str(message["type"])
        if self._told.get(kind) == text:
            return
        self._told[kind] = text
        try:
            channel.send(text)
        except Exception as exc:  # the channel closed meanwhile
            log.debug("room channel of session %s: %s", self.session_id, exc)

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
    def __init__(
        self,
        call_id: str,
        settings: MediaSettings,
        delays: DelayRecorder,
        *,
        group: str | None = None,
    ) -> None:
        self.call_id = call_id
        self.settings = settings
        self.delays = delays
        self.group = group
        """The group of a group call's room; None: a 1:1 call's."""
        self.capacity = settings.group_call_max_participants if group is not None else 2
        """Users with a session here at once (GROUP_CALL_MAX_PARTICIPANTS, or 2)."""
        self.parties: list[str] = []
        """Users admitted, in order of arrival. A 1:1 room admits its first two only; a
        group room forgets a user that left the call (call_participant_left)."""
        self.participants: dict[str, Participant] = {}
        self.pending: dict[str, Participant] = {}
        """A rejoining participant's new session, until its first packet promotes it."""
        self.links: dict[str, PartyLink] = {}
        self.retire: Callable[[Participant], None] = _keep
        """What becomes of a session replaced by a promoted one (Rooms closes it)."""
        self.state = RoomState.WAITING
        self.created_at = time.monotonic()
        self.waiting_timeout_s = settings.timeout_s
        """How long the room waits for media to flow (MEDIA_TIMEOUT_S; the rejoin grace
        for a call moved here)."""
        self.speaker: str | None = None
        """The active speaker (the loudest recent one), see :meth:`pick_speaker`."""
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
        if user_id in self.participants or user_id in self.pending:
            return True
        if self.group is None:
            return user_id in self.parties or len(self.parties) < 2
        return len(self.participants.keys() | self.pending.keys()) < self.capacity

    def present(self) -> list[str]:
        """Users with a current session, in order of arrival."""
        return [u for u in self.parties if u in self.participants]

    def media_flowing(self) -> bool:
        """At least two participants' media reaches the SFU and goes on to another (in a
        1:1 room: both parties, each to the other)."""
        flowing = [p for p in self.participants.values() if p.packets_in > 0 and p.packets_out > 0]
        return len(flowing) >= 2

    def ice_overdue(self, now: float, ice_timeout_s: float) -> Participant | None:
        """A session whose connection has not reached ``connected`` ``ice_timeout_s``
        after its offer came (ICE found no working pair, or DTLS never completed)."""
        for participant in self.participants.values():
            if participant.connected_at is None and now - participant.created_at > ice_timeout_s:
                return participant
        return None

    def stalled(self, now: float, timeout_s: float, ice_timeout_s: float) -> bool:
        """No media for ``timeout_s``: media not flowing that long after the room opened.

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
        return False  # a connected room: each participant is judged by its link

    @staticmethod
    def _last_heard(participant: Participant) -> float:
        return participant.last_packet_at or participant.connected_at or participant.created_at

    def links_changed(self, now: float, stall_s: float) -> list[tuple[str, PeerConnection]]:
        """Move each participant's link along (a connected room only): ``reconnecting``
        once its packets stopped ``stall_s`` ago, ``connected`` when they flow again (on
        the same session or a new one). Returns the changes, in order."""
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
        """A participant reconnecting for longer than ``grace_s`` (it did not come back)."""
        for user_id, link in self.links.items():
            if link.connection is PeerConnection.RECONNECTING and now - link.since > grace_s:
                if user_id in self.participants:
                    return user_id
        return None

    def abandoned(self, now: float, stall_s: float) -> bool:
        """Nobody's packets arrive any more (every participant left or went silent): on a
        draining node, they all moved elsewhere."""
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
        grant_issued_at: float | None = None,
    ) -> tuple[Participant, str]:
        """Answer ``user_id``'s offer with a new session (not yet in the room)."""
        # aiortc's default (balanced) bundle policy puts a second transceiver of a kind on
        # the first one's transport and then never moves it onto the BUNDLE transport:
        # a group offer's slots need max-bundle (every m-line on the first transport).
        config = (
            RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
            if self.group is not None
            else RTCConfiguration(iceServers=[])
        )
        pc = RTCPeerConnection(config)
        participant = Participant(
            user_id=user_id,
            session_id=uuid.uuid4().hex,
            pc=pc,
            grant_issued_at=grant_issued_at,
        )
        try:
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            except Exception as exc:  # aiortc raises ValueError, KeyError, OperationError...
                raise NegotiationError(f"the SDP offer cannot be used: {exc}") from exc
            own, extras = self._split_offer(pc.getTransceivers())
            codecs: dict[str, RTCRtpCodecParameters] = {}
            for transceiver in own:
                codecs[transceiver.kind] = self._choose_codec(transceiver, user_id)
                publication = Publication(
                    participant,
                    transceiver.kind,
                    transceiver,
                    self.settings.keyframe_interval_s,
                    spawn,
                )
                participant.publications[transceiver.kind] = publication
                self._tap_publication(publication)
            for transceiver in extras:
                chosen = codecs.get(transceiver.kind) or self._choose_codec(transceiver, user_id)
                codecs.setdefault(transceiver.kind, chosen)
                offered = internals.negotiated_codecs(transceiver)
                match = next(
                    (c for c in offered if c.name.lower() != "rtx" and _same_codec(c, chosen)),
                    None,
                )
                if match is None:
                    raise NegotiationError(
                        f"slot {transceiver.mid}: {chosen.mimeType} is not offered there"
                    )
                internals.force_codecs(transceiver, _with_rtx(offered, match))
            participant.slots = self._make_slots(own, extras, codecs)
            for transceiver in pc.getTransceivers():
                internals.receive_directly(
                    transceiver.receiver.transport, participant.stamp_arrival
                )

            def _on_state() -> None:
                if pc.connectionState == "connected" and participant.connected_at is None:
                    participant.connected_at = time.monotonic()
                failed = "failed" in (pc.connectionState, pc.iceConnectionState)
                # A session that was replaced (or never joined) fails nobody's call; one
                # that did connect and then failed (ICE consent lost: the participant's
                # network went away) is a silent participant, which the rejoin grace judges.
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

            def _on_channel(channel: RTCDataChannel) -> None:
                if channel.label != ROOM_CHANNEL:
                    return
                participant.channel = channel
                self._tell_slots(participant)
                if self.speaker is not None:
                    participant.tell({"type": "speaker", "user": self.speaker})

            pc.on("datachannel", _on_channel)

            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
            local = pc.localDescription
            return participant, announce_public_ip(local.sdp, self.settings.public_ip)
        except BaseException:
            await pc.close()
            raise

    def _split_offer(
        self, transceivers: list[RTCRtpTransceiver]
    ) -> tuple[list[RTCRtpTransceiver], list[RTCRtpTransceiver]]:
        """The own pair (the first transceiver of each kind) and the slots' transceivers
        (every further one: recvonly, at most capacity - 2 of a kind)."""
        kinds = [t.kind for t in transceivers]
        if not transceivers:
            raise NegotiationError(
                "the offer must have one audio and/or one video transceiver, it has: none"
            )
        own: list[RTCRtpTransceiver] = []
        extras: list[RTCRtpTransceiver] = []
        for transceiver in transceivers:
            if any(t.kind == transceiver.kind for t in own):
                extras.append(transceiver)
            else:
                own.append(transceiver)
        if not extras:
            return own, extras
        if self.group is None:
            raise NegotiationError(
                f"the offer must have one audio and/or one video transceiver, it has: {kinds}"
            )
        most = self.capacity - 2
        for kind in KINDS:
            count = sum(1 for t in extras if t.kind == kind)
            if count > most:
                raise NegotiationError(
                    f"the offer has {count} extra {kind} transceivers; a room of "
                    f"{self.capacity} needs at most {most} (one pair per other participant "
                    "besides the own pair)"
                )
        for transceiver in extras:
            if internals.offered_direction(transceiver) != "sendonly":  # the client's recvonly
                raise NegotiationError(
                    f"media section {transceiver.mid} ({transceiver.kind}): only the first "
                    "audio and the first video transceiver may send; the others must be "
                    "recvonly"
                )
        return own, extras

    def _make_slots(
        self,
        own: list[RTCRtpTransceiver],
        extras: list[RTCRtpTransceiver],
        codecs: dict[str, RTCRtpCodecParameters],
    ) -> list[Slot]:
        """Slot 0 on the own pair, slot k on the k-th extra audio and video transceivers;
        each with a silent sender and a forwarder per kind."""
        pairs: list[list[RTCRtpTransceiver]] = [list(own)]
        counts: dict[str, int] = dict.fromkeys(KINDS, 0)
        for transceiver in extras:
            counts[transceiver.kind] += 1
            index = counts[transceiver.kind]
            while len(pairs) <= index:
                pairs.append([])
            pairs[index].append(transceiver)
        slots: list[Slot] = []
        for index, pair in enumerate(pairs):
            slot = Slot(index)
            for transceiver in pair:
                kind = transceiver.kind
                transceiver.sender.replaceTrack(SilentTrack(kind))
                transceiver.direction = "sendrecv"  # answered sendrecv or sendonly
                codec = codecs.get(kind)
                detector = (
                    KEYFRAME_DETECTORS.get(codec.mimeType.lower())
                    if codec is not None and kind == "video"
                    else None
                )
                forwarder = Forwarder(
                    kind=kind,
                    port=internals.SenderPort(transceiver.sender),
                    payload_types={},
                    keyframe_detector=detector,
                    request_keyframe=_nothing,
                    delays=self.delays,
                )
                internals.tap_rtcp(transceiver.sender, self._subscriber_rtcp(forwarder))
                slot.forwarders[kind] = forwarder
                slot.transceivers[kind] = transceiver
            slots.append(slot)
        return slots

    def _room_codec(self, kind: str, user_id: str) -> RTCRtpCodecParameters | None:
        """The codec the others in the room publish ``kind`` in (one per kind)."""
        for uid, session in self.participants.items():
            if uid == user_id:
                continue
            publication = session.publications.get(kind)
            codec = _media_codec(publication.codecs) if publication is not None else None
            if codec is not None:
                return codec
        return None

    def _choose_codec(self, transceiver: RTCRtpTransceiver, user_id: str) -> RTCRtpCodecParameters:
        """One codec per kind, the same both ways: the others' if they are here."""
        offered = internals.negotiated_codecs(transceiver)
        target = self._room_codec(transceiver.kind, user_id)
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
        return chosen

    def _tap_publication(self, publication: Publication) -> None:
        participant = publication.participant
        receiver = publication.receiver
        codecs = internals.receiver_codecs(receiver)
        rtx_ssrcs = internals.receiver_rtx_ssrcs(receiver)
        participants = self.participants
        pending = self.pending
        user_id = participant.user_id
        audio = publication.kind == "audio"

        def on_rtp(packet: internals.RtpPacket) -> None:
            participant.packets_in += 1
            participant.bytes_in += len(packet.payload)
            now = time.monotonic()
            participant.last_packet_at = now
            if not publication.decoder_stopped:
                internals.stop_decoder(receiver)
                publication.decoder_stopped = True
            codec = codecs.get(packet.payload_type)
            if codec is None:
                return
            if codec.name == "rtx":
                repaired = internals.repaired_packet(packet, codec, codecs, rtx_ssrcs)
                if repaired is None:
                    return
                packet = repaired
            else:
                publication.media_ssrc = packet.ssrc
                if audio and packet.extensions.audio_level is not None:
                    participant.hear(packet.extensions.audio_level[1], now)
            if pending.get(user_id) is participant:
                self.promote(participant)
            for target in publication.targets:  # none for a replaced session
                target.forward(packet, participant.arrived_at)

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
                cap = publication.subscribers_remb(time.monotonic())
                if cap is not None:
                    try:
                        bitrate, ssrcs = internals.unpack_remb_fci(packet.fci)
                    except ValueError:
                        return packet
                    if cap < bitrate:
                        packet.fci = internals.pack_remb_fci(cap, ssrcs)
            return packet

        internals.tap_receiver_rtp(receiver, on_rtp)
        internals.tap_rtcp(receiver, on_rtcp)
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
                    bitrate, ssrcs = internals.unpack_remb_fci(packet.fci)
                except ValueError:
                    return
                # A REMB estimates the subscriber's whole downlink (every SSRC it lists):
                # each stream of it gets an equal share.
                share = bitrate // max(1, len(ssrcs))
                forwarder.subscriber_remb = (share, time.monotonic())

        return on_rtcp

    def join(self, participant: Participant) -> Participant | None:
        """Put a negotiated session in the room. A participant already here rejoins: the
        new session is pending (fed at once, promoted by its first packet) and an earlier
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
        self.wire()  # the others' video is asked for from a keyframe at once
        return earlier

    def promote(self, participant: Participant) -> None:
        """A pending session's media arrived: it becomes the participant's session."""
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

    def sessions(self) -> list[Participant]:
        return [*self.participants.values(), *self.pending.values()]

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

    def drop_user(self, user_id: str, granted_before: float | None = None) -> list[Participant]:
        """The user left the call: remove its sessions opened with a grant issued before
        ``granted_before`` (every one when None); a session from a later grant (it joined
        again) stays. Returns the sessions removed, to be closed."""

        def stale(session: Participant) -> bool:
            if granted_before is None:
                return True
            issued = session.grant_issued_at
            return issued is None or issued < granted_before

        removed: list[Participant] = []
        pending = self.pending.get(user_id)
        if pending is not None and stale(pending):
            removed.append(self.pending.pop(user_id))
        current = self.participants.get(user_id)
        if current is not None and stale(current):
            removed.append(self.participants.pop(user_id))
            if user_id in self.pending:
                self.participants[user_id] = self.pending.pop(user_id)
        if user_id not in self.participants:
            self.links.pop(user_id, None)
            if self.group is not None and user_id in self.parties:
                self.parties.remove(user_id)
            if self.speaker == user_id:
                self.speaker = None
                self._tell_speaker()
        if removed:
            self.wire()
        return removed

    def wire(self) -> None:
        """Place every other participant in one of each session's slots, and point each
        slot's forwarders at that participant's publications (and each publication at the
        forwarders it feeds: the others' current sessions and, while one rejoins, its
        pending one).

        A participant keeps its slot in a session for as long as both are here; a free
        slot goes to the first unplaced participant in order of arrival. Only a forwarder
        whose publication changed starts over (renumbers, and for video waits for a
        keyframe, which is asked for at once): one participant's rejoin leaves the others'
        streams untouched."""
        sessions = self.sessions()
        for session in sessions:
            for published in session.publications.values():
                published.targets = []
        present = self.present()
        wanted: list[Publication] = []
        for subscriber in sessions:
            others = [u for u in present if u != subscriber.user_id]
            for slot in subscriber.slots:
                if slot.user is not None and slot.user not in others:
                    slot.user = None
            placed = {slot.user for slot in subscriber.slots}
            for user in others:
                if user in placed:
                    continue
                free = next((slot for slot in subscriber.slots if slot.user is None), None)
                if free is None:
                    break
                free.user = user
                placed.add(user)
            subscriber.unplaced = [u for u in others if u not in placed]
            for slot in subscriber.slots:
                publisher = self.participants.get(slot.user) if slot.user is not None else None
                for kind, forwarder in slot.forwarders.items():
                    publication = publisher.publications.get(kind) if publisher else None
                    if publication is None:
                        forwarder.use_source({})
                        forwarder.source = None
                        forwarder.request_keyframe = _nothing
                        continue
                    if forwarder.source is not publication:
                        forwarder.use_source(
                            payload_type_map(
                                publication.codecs,
                                internals.negotiated_codecs(slot.transceivers[kind]),
                            ),
                            _clock_rate(publication),
                        )
                        forwarder.source = publication
                        if kind == "video" and publication not in wanted:
                            wanted.append(publication)  # a keyframe for the new subscriber
                    forwarder.request_keyframe = publication.request_keyframe
                    if forwarder.payload_types:
                        publication.targets.append(forwarder)
            self._tell_slots(subscriber)
        for publication in wanted:
            publication.request_keyframe()

    def _tell_slots(self, subscriber: Participant) -> None:
        subscriber.tell(
            {
                "type": "slots",
                "slots": [
                    {
                        "slot": slot.index,
                        "audio_mid": slot.mid("audio"),
                        "video_mid": slot.mid("video"),
                        "user": slot.user,
                    }
                    for slot in subscriber.slots
                ],
                "participants": self.present(),
                "unplaced": list(subscriber.unplaced),
            }
        )

    # ------------------------------------------------------------------ active speaker

    def pick_speaker(self, now: float) -> bool:
        """The loudest participant speaking now becomes the speaker if there is none, the
        current one stopped speaking, or it is ``SPEAKER_SWITCH_DB`` louder. True if the
        speaker changed (and every participant was told)."""
        speaking = [p for p in self.participants.values() if p.speaking(now)]
        if not speaking:
            return False
        loudest = max(speaking, key=lambda p: p.loudness or 0.0)
        if loudest.user_id == self.speaker:
            return False
        current = self.participants.get(self.speaker) if self.speaker is not None else None
        if (
            current is not None
            and current.speaking(now)
            and (loudest.loudness or 0.0) < (current.loudness or 0.0) + SPEAKER_SWITCH_DB
        ):
            return False
        self.speaker = loudest.user_id
        self._tell_speaker()
        return True

    def _tell_speaker(self) -> None:
        for session in self.sessions():
            session.tell({"type": "speaker", "user": self.speaker})

    # ------------------------------------------------------------------ stats

    async def stats(self) -> dict[str, Any]:
        participants = []
        for participant in list(self.participants.values()):  # it may change meanwhile
            participants.append(await _participant_stats(participant))
        return {
            "call_id": self.call_id,
            "node_id": self.settings.node_id,
            "state": self.state.value,
            "group": self.group,
            "active_speaker": self.speaker,
            "participants": participants,
        }

    async def close(self) -> None:
        sessions = self.sessions()
        self.participants.clear()
        self.pending.clear()
        await asyncio.gather(*(p.pc.close() for p in sessions), return_exceptions=True)


def _clock_rate(publication: Publication) -> int | None:
    codec = _media_codec(publication.codecs)
    return codec.clockRate if codec is not None else None


def _nothing() -> None:
    return None


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
        "audio_level": None if participant.loudness is None else round(participant.loudness, 1),
        "slots": [slot.user for slot in participant.slots],
        "unplaced": list(participant.unplaced),
    }


__all__ = [
    "CloseReason",
    "MediaFailure",
    "NegotiationError",
    "Participant",
    "Room",
    "RoomState",
    "Slot",
]
