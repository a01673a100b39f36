"""Packet forwarding: one party's published track into the other party's sender.

Nothing is decoded. A forwarded packet keeps its payload and marker; it gets the
subscriber sender's ssrc, the payload type the subscriber negotiated for the same codec,
and a sequence number and RTP timestamp shifted by offsets, so the subscriber sees one
continuous stream even when the publisher rejoins (new ssrc, new numbering, a new random
timestamp base): after a switch the timestamps go on from the last one sent, advanced by
the time that passed. The first source's timestamps are kept as they are. Video is held
back from a new source until a keyframe starts, and a keyframe is asked for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.media.aiortc_internals import RtpPacket, SenderPort
from services.media.delays import SAMPLE_EVERY, DelayRecorder

DELAY_SAMPLE_MASK = SAMPLE_EVERY - 1

KEYFRAME_RETRY_S = 1.0
"""While video is held for a keyframe, ask the publisher again this often."""


def is_vp8_keyframe_start(payload: bytes) -> bool:
    """The first packet of a VP8 keyframe (RFC 7741 payload descriptor + VP8 header)."""
    if len(payload) < 2:
        return False
    first = payload[0]
    if not first & 0x10 or first & 0x07:  # S bit set and partition id 0
        return False
    pos = 1
    if first & 0x80:  # X: extension byte follows
        ext = payload[1]
        pos = 2
        if ext & 0x80:  # I: picture id, 7 or 15 bits
            if pos >= len(payload):
                return False
            pos += 2 if payload[pos] & 0x80 else 1
        if ext & 0x40:  # L: TL0PICIDX
            pos += 1
        if ext & 0x30:  # T or K: TID/Y/KEYIDX
            pos += 1
    if pos >= len(payload):
        return False
    return not payload[pos] & 0x01  # P bit 0: a key frame


_H264_KEY_NALS = frozenset({5, 7})  # IDR slice, SPS


def is_h264_keyframe_start(payload: bytes) -> bool:
    """An IDR or SPS in a single NAL, a STAP-A, or the first fragment of an FU-A."""
    if not payload:
        return False
    nal = payload[0] & 0x1F
    if nal in _H264_KEY_NALS:
        return True
    if nal == 24:  # STAP-A: 2-byte sizes, each followed by a NAL
        pos = 1
        while pos + 2 < len(payload):
            size = int.from_bytes(payload[pos : pos + 2], "big")
            if payload[pos + 2] & 0x1F in _H264_KEY_NALS:
                return True
            pos += 2 + size
        return False
    if nal == 28 and len(payload) > 1:  # FU-A
        return bool(payload[1] & 0x80) and (payload[1] & 0x1F) in _H264_KEY_NALS
    return False


KEYFRAME_DETECTORS: dict[str, Callable[[bytes], bool]] = {
    "video/vp8": is_vp8_keyframe_start,
    "video/h264": is_h264_keyframe_start,
}


@dataclass
class ForwardCounters:
    packets: int = 0
    bytes: int = 0


@dataclass
class Forwarder:
    """Everything published of one kind toward one subscriber's sender."""

    kind: str
    port: SenderPort
    payload_types: dict[int, int]
    """Publisher payload type -> the subscriber's payload type for the same codec."""
    keyframe_detector: Callable[[bytes], bool] | None
    request_keyframe: Callable[[], None]
    delays: DelayRecorder
    counters: ForwardCounters = field(default_factory=ForwardCounters)
    source_ssrc: int | None = None
    holding: bool = False
    source: object | None = None
    """The publication feeding this forwarder now (the room's wiring compares it)."""
    subscriber_remb: tuple[int, float] | None = None
    """The subscriber's last REMB (bits/s, monotonic time), to cap the publisher's."""
    clock_rate: int = 90_000
    """Of the source's codec: how far the timestamps advance over a gap between sources."""
    _offset: int = 0
    _last_out: int | None = None
    _ts_offset: int = 0
    _last_ts_out: int | None = None
    _last_sent_at: float = 0.0
    _rebase: bool = True
    _last_request: float = float("-inf")

    def use_source(self, payload_types: dict[int, int], clock_rate: int | None = None) -> None:
        """A (new) publisher feeds this forwarder: renumber and, for video, wait for a key."""
        self.payload_types = payload_types
        if clock_rate:
            self.clock_rate = clock_rate
        self.source_ssrc = None

    def out_timestamp(self, ssrc: int, timestamp: int) -> int | None:
        """A timestamp of source ``ssrc`` as the subscriber sees it (its sender reports);
        None when ``ssrc`` is not the source being forwarded now."""
        if ssrc != self.source_ssrc or self._rebase:
            return None
        return (timestamp + self._ts_offset) & 0xFFFFFFFF

    def forward(self, packet: RtpPacket, arrived_at: float) -> None:
        if not self.port.started:
            self.port.refresh()
            if not self.port.started:
                return  # the subscriber's DTLS is not up yet
        if packet.ssrc != self.source_ssrc:
            self.source_ssrc = packet.ssrc
            self._rebase = True
            self.holding = self.keyframe_detector is not None
        if self.holding:
            assert self.keyframe_detector is not None
            if not self.keyframe_detector(packet.payload):
                now = time.monotonic()
                if now - self._last_request >= KEYFRAME_RETRY_S:
                    self._last_request = now
                    self.request_keyframe()
                return
            self.holding = False
        payload_type = self.payload_types.get(packet.payload_type)
        if payload_type is None:
            return
        seq_in = packet.sequence_number
        now = time.monotonic()
        if self._rebase:
            start = 0 if self._last_out is None else (self._last_out + 1) & 0xFFFF
            self._offset = (start - seq_in) & 0xFFFF
            if self._last_ts_out is not None:
                elapsed = max(1, round((now - self._last_sent_at) * self.clock_rate))
                self._ts_offset = (self._last_ts_out + elapsed - packet.timestamp) & 0xFFFFFFFF
            self._rebase = False
        seq = (seq_in + self._offset) & 0xFFFF
        timestamp = (packet.timestamp + self._ts_offset) & 0xFFFFFFFF
        if self._last_out is None or 0 < ((seq - self._last_out) & 0xFFFF) < 0x8000:
            self._last_out = seq
            self._last_ts_out = timestamp
            self._last_sent_at = now
        out = RtpPacket(
            payload_type=payload_type,
            marker=packet.marker,
            sequence_number=seq,
            timestamp=timestamp,
            payload=packet.payload,
        )
        out.padding_size = packet.padding_size
        if packet.extensions.audio_level is not None:
            out.extensions.audio_level = packet.extensions.audio_level
        try:
            self.port.send(out)
        except ConnectionError:
            return
        self.counters.packets += 1
        self.counters.bytes += len(packet.payload)
        delays = self.delays
        delays.forwarded += 1
        if not delays.forwarded & DELAY_SAMPLE_MASK:
            delays.record(time.perf_counter() - arrived_at)
