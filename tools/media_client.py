"""An aiortc client for the SFU's tests and benchmark: it sends pre-encoded VP8 and Opus
(encoded once, so a client costs little CPU) and records what goes out and comes in.

What it records is the RTP payload of each media packet, before SRTP on the way out
and after it on the way in (retransmissions unwrapped), with the RTP timestamp: the SFU
keeps payloads (and the first source's timestamps), so the two sides can be compared byte
for byte. With each packet it records its arrival (monotonic time, sequence number, RTP
timestamp), so a test can measure a media gap and check continuity across a rejoin.

A group call's client (``slots=k``) offers k recvonly audio+video pairs besides its own
and opens the ``room`` data channel: it records what each slot (by ``mid``) receives and
the SFU's messages, so a test knows whose media came in which slot (docs/media.md).

A client rejoins (:meth:`MediaClient.rejoin`) as a browser does: a new peer connection,
a new offer, make-before-break (the old connection goes on until the new one carries
media). :meth:`MediaClient.go_offline` makes its transport go silent both ways (the SFU
hears nothing, as when a network goes away) without closing anything.
"""

from __future__ import annotations

import asyncio
import fractions
import itertools
import json
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import av
import httpx
from aiortc import (
    MediaStreamTrack,
    RTCBundlePolicy,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RtcpPsfbPacket,
    RtpPacket,
    is_rtcp,
    pack_remb_fci,
    unpack_remb_fci,
)

from services.media import aiortc_internals as internals
from shared.clock import wait_set

VIDEO_CLOCK = 90_000
AUDIO_CLOCK = 48_000


@dataclass(frozen=True)
class EncodedMedia:
    """A loop of encoded frames: bytes of each, and how long each lasts."""

    frames: list[bytes]
    clock_rate: int
    ticks_per_frame: int
    frame_s: float


def encode_vp8(
    width: int = 640,
    height: int = 480,
    seconds: float = 3.0,
    fps: int = 30,
    bitrate: int = 1_000_000,
    noise_rows: int | None = None,
) -> EncodedMedia:
    """VP8 of a still pattern crossed by a moving band of noise, a keyframe a second.

    libvpx's rate control does not hold noise to a bitrate, so the band's height sets it:
    ``height // 24`` rows give about 1 Mbps at 640x480 (and 150 kbps at 160x120).
    """
    codec = av.CodecContext.create("libvpx", "w")
    codec.width = width
    codec.height = height
    codec.pix_fmt = "yuv420p"
    codec.bit_rate = bitrate
    codec.framerate = fractions.Fraction(fps, 1)
    codec.time_base = fractions.Fraction(1, fps)
    codec.gop_size = fps
    codec.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    rows = noise_rows if noise_rows is not None else max(1, height // 24)
    pattern = bytes((x * 7) % 256 for x in range(width * height))
    frames: list[bytes] = []
    count = int(seconds * fps)
    for index in range(count):
        frame = av.VideoFrame(width, height, "yuv420p")
        luma = bytearray(pattern)
        start = (index * 4) % (height - rows)
        luma[start * width : (start + rows) * width] = os.urandom(rows * width)
        frame.planes[0].update(bytes(luma))
        for plane in frame.planes[1:]:
            plane.update(bytes([128]) * plane.buffer_size)
        frame.pts = index
        frames.extend(bytes(packet) for packet in codec.encode(frame))
    frames.extend(bytes(packet) for packet in codec.encode(None))
    return EncodedMedia(frames, VIDEO_CLOCK, VIDEO_CLOCK // fps, 1 / fps)


def encode_opus(seconds: float = 1.0) -> EncodedMedia:
    """20 ms Opus frames of noise (a codec's worth of bits, like speech)."""
    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate = AUDIO_CLOCK
    codec.layout = "stereo"
    codec.format = "s16"
    codec.bit_rate = 48_000
    codec.time_base = fractions.Fraction(1, AUDIO_CLOCK)
    frames: list[bytes] = []
    samples = 960
    for index in range(int(seconds * 50)):
        frame = av.AudioFrame(format="s16", layout="stereo", samples=samples)
        frame.planes[0].update(os.urandom(samples * 4))
        frame.sample_rate = AUDIO_CLOCK
        frame.pts = index * samples
        for packet in codec.encode(frame):
            frames.append(bytes(packet))
    return EncodedMedia(frames, AUDIO_CLOCK, samples, 0.02)


def is_vp8_keyframe(frame: bytes) -> bool:
    """A VP8 frame (not RTP) that is a keyframe: the P bit of its first byte is 0."""
    return bool(frame) and not frame[0] & 0x01


class EncodedTrack(MediaStreamTrack):
    """Plays an :class:`EncodedMedia` loop in real time, as ``av.Packet`` (aiortc packs it
    into RTP without encoding). Like an encoder, it answers a keyframe request: the next
    frame it plays is the loop's next keyframe."""

    def __init__(self, kind: str, media: EncodedMedia) -> None:
        super().__init__()
        self.kind = kind
        self._media = media
        self._index = 0
        self._shift = 0
        self._start: float | None = None
        self._keys = (
            [i for i, f in enumerate(media.frames) if is_vp8_keyframe(f)] if kind == "video" else []
        )
        self._key_wanted = False

    def request_keyframe(self) -> None:
        self._key_wanted = bool(self._keys)

    def _next_frame(self) -> bytes:
        frames = self._media.frames
        position = (self._index + self._shift) % len(frames)
        if self._key_wanted:
            self._key_wanted = False
            key = next((k for k in self._keys if k >= position), self._keys[0])
            self._shift += (key - position) % len(frames)
            position = key
        return frames[position]

    async def recv(self) -> Any:
        media = self._media
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self._index * media.frame_s
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        packet = av.Packet(self._next_frame())
        packet.pts = self._index * media.ticks_per_frame
        packet.time_base = fractions.Fraction(1, media.clock_rate)
        self._index += 1
        return packet


@dataclass
class Flow:
    """Media of one kind one way: (rtp timestamp, payload) per packet, and counts."""

    payloads: list[tuple[int, bytes]] = field(default_factory=list)
    sequence_numbers: set[int] = field(default_factory=set)
    packets: int = 0
    dropped: int = 0
    first_at: float | None = None
    window_packets: int = 0
    """Counted while the client is ``measuring`` (benchmark windows)."""
    window_frames: int = 0
    window_seqs: set[int] = field(default_factory=set)
    """Extended (unwrapped) sequence numbers seen in the window."""
    arrivals: list[tuple[float, int, int, int]] = field(default_factory=list)
    """(monotonic time, sequence number, RTP timestamp, ssrc) of each packet, in step
    with ``payloads``: when it was sent or arrived."""
    last_at: float | None = None
    _ext: int | None = None

    def largest_gap(self, start: float, end: float = float("inf")) -> float | None:
        """The longest time between two packets that arrived in [start, end]: the media
        gap of a rejoin (last packet before it, first packet after it)."""
        times = [at for at, *_ in self.arrivals if start <= at <= end]
        if len(times) < 2:
            return None
        return max(b - a for a, b in itertools.pairwise(times))

    def extend(self, seq: int) -> int:
        if self._ext is None:
            self._ext = seq
        else:
            delta = ((seq - (self._ext & 0xFFFF) + 0x8000) & 0xFFFF) - 0x8000
            self._ext += delta
        return self._ext


class MediaClient:
    """One party: an offer with audio and video, sendrecv, to ``POST .../sessions``."""

    def __init__(
        self,
        video: EncodedMedia | None,
        audio: EncodedMedia | None,
        *,
        record: bool = True,
        drop_out: float = 0.0,
        drop_in: float = 0.0,
        light: bool = False,
        seed: int | None = None,
        slots: int = 0,
        room_channel: bool | None = None,
        audio_level: int | None = None,
    ) -> None:
        self.slots = slots
        """Recvonly audio+video pairs offered besides the own pair (a group call)."""
        self.pc = RTCPeerConnection(self._config())
        self._video = video
        self._audio = audio
        self.record = record
        self.drop_out = drop_out
        self.drop_in = drop_in
        self.light = light
        """Count incoming packets only: no NACKs, no receiver reports (benchmark clients)."""
        self._random = random.Random(seed)
        self.room_channel = slots > 0 if room_channel is None else room_channel
        self.audio_level = audio_level
        """The RFC 6464 level (0 loudest, 127 silence) every audio packet carries; None:
        no level (aiortc sets one only for audio it encodes itself)."""
        self.messages: list[dict[str, Any]] = []
        """What the SFU sent on the ``room`` channel, in order."""
        self.by_mid: dict[str, Flow] = {}
        """What each receiving transceiver (by mid) got: one slot's kind each."""
        self.sent: dict[str, Flow] = {"audio": Flow(), "video": Flow()}
        self.received: dict[str, Flow] = {"audio": Flow(), "video": Flow()}
        self.location: str | None = None
        self.measuring = False
        self.keyframe_requests = 0
        self.received_ssrcs: set[int] = set()
        self.rembs: list[int] = []
        """Bitrates of the REMBs received for what this client sends."""
        """PLI/FIR received for what this client sends."""
        self._ssrc_kind: dict[int, str] = {}
        self.offline = False
        """Drop every SRTP/SRTCP packet both ways (the transport goes silent)."""
        self.rejoins: list[tuple[float, float | None]] = []
        """Per rejoin: when it started, and when its connection's first packet came."""
        self.retired: list[RTCPeerConnection] = []
        self._media_url: str | None = None
        self._token: str | None = None
        self._auto: asyncio.Task[None] | None = None

    def _config(self) -> RTCConfiguration:
        """Max-bundle for a group client: aiortc's balanced policy would leave the second
        transceiver of a kind on a transport BUNDLE never uses (see services/media/room.py)."""
        if self.slots:
            return RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
        return RTCConfiguration(iceServers=[])

    async def connect(
        self,
        url: str,
        token: str,
        client: httpx.AsyncClient,
        *,
        rewrite_offer: Callable[[str], str] | None = None,
        apply_answer: bool = True,
    ) -> httpx.Response:
        """Offer, POST, answer. Returns the HTTP response (201 or the refusal).

        ``rewrite_offer`` changes the SDP posted (not the client's own description), and
        without ``apply_answer`` the client never starts ICE: ways to break a session.
        """
        self._media_url, self._token = url, token
        return await self._offer(self.pc, url, token, client, rewrite_offer, apply_answer)

    async def _offer(
        self,
        pc: RTCPeerConnection,
        url: str,
        token: str,
        client: httpx.AsyncClient,
        rewrite_offer: Callable[[str], str] | None = None,
        apply_answer: bool = True,
        on_first_packet: Callable[[], None] | None = None,
    ) -> httpx.Response:
        offer = await self._local_offer(pc, on_first_packet)
        response = await client.post(
            url,
            content=rewrite_offer(offer) if rewrite_offer else offer,
            headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {token}"},
        )
        if response.status_code == 201:
            self.location = response.headers["location"]
            if apply_answer:
                await pc.setRemoteDescription(
                    RTCSessionDescription(sdp=response.text, type="answer")
                )
        return response

    async def negotiate(self, exchange: Callable[[str], Awaitable[str]]) -> None:
        """Offer through ``exchange`` (offer SDP in, answer SDP out): another server's
        signalling (Janus's videoroom, tools/loadtest/janus.py)."""
        offer = await self._local_offer(self.pc, None)
        answer = await exchange(offer)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

    async def answer(self, offer: str) -> str:
        """Take what a server offers to send (Janus's subscriber): the answer's SDP."""
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        for transceiver in self.pc.getTransceivers():
            self._tap_receiver(transceiver.kind, transceiver.receiver, None, transceiver)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return str(self.pc.localDescription.sdp)

    async def _local_offer(
        self, pc: RTCPeerConnection, on_first_packet: Callable[[], None] | None
    ) -> str:
        for kind, media in (("audio", self._audio), ("video", self._video)):
            if media is None:
                pc.addTransceiver(kind, direction="recvonly")
            else:
                pc.addTrack(EncodedTrack(kind, media))
        own = list(pc.getTransceivers())
        for _ in range(self.slots):
            pc.addTransceiver("audio", direction="recvonly")
            pc.addTransceiver("video", direction="recvonly")
        for transceiver in pc.getTransceivers():
            self._tap_receiver(transceiver.kind, transceiver.receiver, on_first_packet, transceiver)
            if transceiver in own:
                self._ssrc_kind[transceiver.sender._ssrc] = transceiver.kind
                self._tap_sender_rtcp(transceiver.sender)
                if transceiver.kind == "audio":
                    self._tap_audio_level(transceiver.sender)
        if self.room_channel:
            channel = pc.createDataChannel("room")

            @channel.on("message")
            def on_message(message: Any) -> None:
                if isinstance(message, str) and pc not in self.retired:
                    self.messages.append(json.loads(message))

        await pc.setLocalDescription(await pc.createOffer())
        self._tap_sending(pc)
        return str(pc.localDescription.sdp)

    async def rejoin(
        self,
        media_url: str,
        media_token: str,
        client: httpx.AsyncClient,
        *,
        video: EncodedMedia | None = None,
        audio: EncodedMedia | None = None,
        carried_timeout_s: float = 10.0,
    ) -> httpx.Response:
        """A new peer connection to ``media_url`` (the same node or another), replacing
        this client's session make-before-break: the old connection goes on until the new
        one carries media (or ``carried_timeout_s`` passed), then it is closed.

        ``video``/``audio`` replace what the client sends from now on (a test tells the
        two sessions' packets apart by their payloads)."""
        self._video = video or self._video
        self._audio = audio or self._audio
        old, new = self.pc, RTCPeerConnection(self._config())
        carried = asyncio.Event()
        started = time.monotonic()
        self.rejoins.append((started, None))
        index = len(self.rejoins) - 1

        def first_packet() -> None:
            if not carried.is_set():
                self.rejoins[index] = (started, time.monotonic())
                carried.set()

        response = await self._offer(
            new, media_url, media_token, client, on_first_packet=first_packet
        )
        if response.status_code != 201:
            await new.close()
            return response
        self.pc = new
        self._media_url, self._token = media_url, media_token
        self.retired.append(old)
        await wait_set(carried, carried_timeout_s)
        await old.close()
        return response

    def auto_rejoin(
        self,
        client: httpx.AsyncClient,
        *,
        stall_s: float = 2.0,
        grant: Callable[[], Any] | None = None,
    ) -> None:
        """Rejoin by itself when nothing has arrived for ``stall_s`` (as the web client
        does); ``grant()`` (sync or async) may give a new ``(media_url, media_token)``,
        else the last ones are used again."""

        async def watch() -> None:
            while True:
                await asyncio.sleep(stall_s / 4)
                last = max(
                    (f.last_at for f in self.received.values() if f.last_at is not None),
                    default=None,
                )
                if last is None or time.monotonic() - last < stall_s or self.offline:
                    continue
                target = grant() if grant is not None else (self._media_url, self._token)
                if asyncio.iscoroutine(target):
                    target = await target
                url, token = target
                if url and token:
                    await self.rejoin(url, token, client)

        self._auto = asyncio.get_running_loop().create_task(watch())

    def slot_users(self) -> dict[str, str | None]:
        """mid -> the user the SFU says that mid carries now (the last ``slots`` message)."""
        last = next((m for m in reversed(self.messages) if m.get("type") == "slots"), None)
        if last is None:
            return {}
        users: dict[str, str | None] = {}
        for slot in last["slots"]:
            for key in ("audio_mid", "video_mid"):
                if slot[key] is not None:
                    users[slot[key]] = slot["user"]
        return users

    def mid_of(self, user: str, kind: str) -> str | None:
        """The mid of ``kind`` that carries ``user`` now."""
        last = next((m for m in reversed(self.messages) if m.get("type") == "slots"), None)
        for slot in last["slots"] if last else []:
            if slot["user"] == user:
                mid: str | None = slot[f"{kind}_mid"]
                return mid
        return None

    def from_user(self, user: str, kind: str) -> Flow:
        """What arrived on the mid that carries ``user`` now (a fresh Flow if none)."""
        mid = self.mid_of(user, kind)
        return self.by_mid.get(mid, Flow()) if mid is not None else Flow()

    @property
    def speaker(self) -> str | None:
        last = next((m for m in reversed(self.messages) if m.get("type") == "speaker"), None)
        return None if last is None else last["user"]

    def _tap_audio_level(self, sender: RTCRtpSender) -> None:
        original = sender._next_encoded_frame

        async def next_frame(codec: Any) -> Any:
            frame = await original(codec)
            if frame is not None and self.audio_level is not None:
                frame.audio_level = -self.audio_level  # aiortc writes -audio_level
            return frame

        sender._next_encoded_frame = next_frame  # type: ignore[method-assign]

    def go_offline(self, offline: bool = True) -> None:
        """The transport goes silent both ways (or comes back): nothing is closed."""
        self.offline = offline

    def _tap_sender_rtcp(self, sender: RTCRtpSender) -> None:
        original = sender._handle_rtcp_packet

        async def handle(packet: Any) -> None:
            if isinstance(packet, RtcpPsfbPacket) and packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
                self.keyframe_requests += 1
                if isinstance(sender.track, EncodedTrack):
                    sender.track.request_keyframe()
            elif isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
                self.rembs.append(unpack_remb_fci(packet.fci)[0])
            await original(packet)

        sender._handle_rtcp_packet = handle  # type: ignore[method-assign]

    async def request_keyframe(self) -> None:
        """Send a PLI for the video this client receives (as a decoder that lost a frame)."""
        for transceiver in self.pc.getTransceivers():
            if transceiver.kind == "video":
                ssrc = next(iter(self.received_ssrcs), None)
                if ssrc is not None:
                    await transceiver.receiver._send_rtcp_pli(ssrc)

    async def send_remb(self, bitrate: int) -> None:
        """Tell the sender of the video this client receives to stay under ``bitrate``
        (one REMB for the whole downlink: every video ssrc received, as Chromium does)."""
        for transceiver in self.pc.getTransceivers():
            if transceiver.kind == "video" and self.received_ssrcs:
                packet = RtcpPsfbPacket(
                    fmt=RTCP_PSFB_APP,
                    ssrc=transceiver.sender._ssrc,
                    media_ssrc=0,
                    fci=pack_remb_fci(bitrate, sorted(self.received_ssrcs)),
                )
                await transceiver.receiver._send_rtcp(packet)
                return

    def _tap_sending(self, pc: RTCPeerConnection) -> None:
        transports = {id(t.sender.transport): t.sender.transport for t in pc.getTransceivers()}
        for transport in transports.values():
            self._tap_transport(transport)

    def _tap_transport(self, transport: Any) -> None:
        original: Callable[[bytes], Any] = transport._send_rtp

        async def send(data: bytes) -> None:
            if self.offline:
                return
            if not is_rtcp(data):
                packet = RtpPacket.parse(data)
                kind = self._ssrc_kind.get(packet.ssrc)
                if kind is not None:  # media, not a retransmission
                    if self.drop_out and self._random.random() < self.drop_out:
                        self.sent[kind].dropped += 1
                        self._note(self.sent[kind], packet)
                        return
                    self._note(self.sent[kind], packet)
            await original(data)

        transport._send_rtp = send

    def _note(self, flow: Flow, packet: RtpPacket) -> None:
        flow.packets += 1
        now = time.monotonic()
        flow.last_at = now
        if flow.first_at is None:
            flow.first_at = now
        if self.measuring:
            flow.window_packets += 1
            flow.window_frames += packet.marker
            flow.window_seqs.add(flow.extend(packet.sequence_number))
        if self.record:
            flow.payloads.append((packet.timestamp, packet.payload))
            flow.arrivals.append((now, packet.sequence_number, packet.timestamp, packet.ssrc))
            flow.sequence_numbers.add(packet.sequence_number)

    def _tap_receiver(
        self,
        kind: str,
        receiver: RTCRtpReceiver,
        on_first_packet: Callable[[], None] | None = None,
        transceiver: Any = None,
    ) -> None:
        original = receiver._handle_rtp_packet
        codecs = internals.receiver_codecs(receiver)
        rtx_ssrcs = internals.receiver_rtx_ssrcs(receiver)
        flow = self.received[kind]

        async def handle(packet: RtpPacket, arrival_time_ms: int) -> None:
            internals.stop_decoder(receiver)
            if self.offline:
                return
            if on_first_packet is not None:
                on_first_packet()
            if self.drop_in and self._random.random() < self.drop_in:
                flow.dropped += 1
                return
            codec = codecs.get(packet.payload_type)
            media = packet
            if codec is not None and codec.name == "rtx":
                apt = codec.parameters.get("apt")
                ssrc = rtx_ssrcs.get(packet.ssrc)
                if ssrc is None or not isinstance(apt, int) or len(packet.payload) < 2:
                    media = None  # type: ignore[assignment]
                else:
                    media = internals.unwrap_rtx(packet, payload_type=apt, ssrc=ssrc)
            if media is not None:
                self._note(flow, media)
                mid = transceiver.mid if transceiver is not None else None
                if mid is not None and self.slots:
                    self._note(self.by_mid.setdefault(mid, Flow()), media)
                if kind == "video":
                    self.received_ssrcs.add(media.ssrc)
            if not self.light:
                await original(packet, arrival_time_ms)

        receiver._handle_rtp_packet = handle  # type: ignore[method-assign]

    async def leave(self, client: httpx.AsyncClient, base_url: str, token: str) -> int:
        assert self.location is not None
        response = await client.delete(
            base_url + self.location, headers={"Authorization": f"Bearer {token}"}
        )
        return response.status_code

    async def close(self) -> None:
        if self._auto is not None:
            self._auto.cancel()
            await asyncio.gather(self._auto, return_exceptions=True)
        await asyncio.gather(
            self.pc.close(), *(pc.close() for pc in self.retired), return_exceptions=True
        )
