"""Every aiortc internal the SFU relies on, and nothing else.

aiortc has no public API for forwarding RTP without decoding (its maintainer says so in
aiortc issues #449 and #627), so the SFU reaches into a handful of private attributes and
methods. They are all named here, so that the day an aiortc upgrade moves one of them,
:func:`check_internals` (run at start-up and by ``tests/test_media_internals.py``) fails
loudly, naming what moved, instead of media silently stopping. aiortc is pinned exactly
in pyproject.toml for the same reason. All of these were unchanged from aiortc 1.9 to 1.16.

What is relied upon:

- ``RTCRtpReceiver._handle_rtp_packet(packet, arrival_time_ms)``: replaced per instance;
  the SFU forwards first, then does the part of aiortc's handling it relies on, with the
  receiver's own state (``_enabled``, ``__remote_bitrate_estimator`` and ``__rtcp_ssrc``
  for REMB, ``__remote_streams`` for receiver reports, ``__nack_generator`` and
  ``_send_rtcp_nack`` for NACKs), and skips what only feeds the decoder (payload
  descriptors, the jitter buffer) or ``getSynchronizationSources``.
  ``RTCRtpReceiver._handle_rtcp_packet(packet)``: wrapped to read the
  publisher's sender reports. ``RTCRtpReceiver._send_rtcp(packet)``: wrapped to lower
  the REMB the SFU sends. ``RTCRtpReceiver._send_rtcp_pli(media_ssrc)``: to ask the
  publisher for a keyframe. ``RTCRtpReceiver.__stop_decoder()``: the SFU never decodes.
  ``RTCRtpReceiver.__codecs`` (payload type -> codec) and ``__rtx_ssrc`` (RTX ssrc ->
  media ssrc): to unwrap retransmissions.
- ``RTCRtpSender._handle_rtcp_packet(packet)``: wrapped to turn a subscriber's PLI/FIR
  into a PLI to the publisher and to read its REMB; the original still answers NACKs
  from ``RTCRtpSender.__rtp_history`` (seq % ``aiortc.rtp.RTP_HISTORY_SIZE`` -> packet),
  where the SFU stores what it forwards. ``__rtp_header_extensions_map`` and ``__mid``:
  to serialize a forwarded packet as the sender would. ``__ntp_timestamp``,
  ``__rtp_timestamp``, ``__octet_count``, ``__packet_count``: what the sender's RTCP
  sender report carries (the publisher's NTP/RTP pair, for lip sync).
- ``RTCDtlsTransport._state``, ``_tx_srtp``, ``__tx_bytes``, ``__tx_packets``,
  ``RTCIceTransport._connection``, ``aioice.Connection._nominated`` (component -> pair,
  its ``protocol.transport`` and ``remote_addr``): to SRTP-protect and send one
  serialized packet as ``RTCDtlsTransport._send_rtp(data)`` would, without its
  coroutines; ``RTCDtlsTransport._handle_rtp_data(data, arrival_time_ms)``: wrapped per instance
  to timestamp a packet's arrival (the forwarding delay starts there).
- The receive side, to handle an SRTP packet in the socket's callback as
  ``RTCDtlsTransport._recv_next`` would (:func:`receive_directly`):
  ``aioice.Connection.data_received(data, component)`` (replaced per instance) and its
  ``_queue`` (an ``asyncio.Queue``: only while it is empty), ``RTCDtlsTransport._rx_srtp``,
  ``__rx_bytes``, ``__rx_packets``, ``_rtp_header_extensions_map`` and
  ``_rtp_router.route_rtp(packet)``. ``aioice.ice.StunProtocol`` (``receiver``,
  ``local_candidate``): subclassed and put in its place, so that RTP and RTCP are not
  parsed as STUN first.
- ``RTCRtpTransceiver._codecs``: the negotiated codecs, set after the remote
  description to force a subscriber onto the publisher's codec.
  ``RTCRtpTransceiver._offerDirection``: the direction an offer's media section asks of
  the answerer (``sendonly`` for the client's ``recvonly``): a group call's slots.
- ``RemoteBitrateEstimator.incoming_bitrate`` (a ``RateCounter``: ``_window_size``,
  ``_scale``, replaced by :class:`WindowRate`) and ``.estimator`` (an
  ``OveruseEstimator``: ``ts_delta_hist``, ``update_min_frame_period(ts_delta)``
  replaced per instance), ``aiortc.rate.MIN_FRAME_PERIOD_HISTORY_LENGTH``: the same
  estimate, computed for less (:func:`speed_up_estimator`).
- ``aiortc.rtp``: ``RtpPacket``, ``unwrap_rtx``, ``pack_remb_fci``/``unpack_remb_fci``,
  ``RTP_HISTORY_SIZE``, ``HeaderExtensionsMap``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from struct import pack
from typing import Any

import aioice
import aiortc
import pylibsrtp
from aioice import ice as aioice_ice
from aioice import turn as aioice_turn
from aioice.candidate import candidate_foundation, candidate_priority
from aiortc import RTCPeerConnection, RTCRtpReceiver, RTCRtpSender, RTCRtpTransceiver
from aiortc import rate as aiortc_rate
from aiortc import rtcicetransport as aiortc_icetransport
from aiortc import rtp as aiortc_rtp
from aiortc.rate import OveruseEstimator, RateCounter, RemoteBitrateEstimator
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcdtlstransport import State as DtlsState
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtcrtpreceiver import NackGenerator, StreamStatistics
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTP_HISTORY_SIZE,
    AnyRtcpPacket,
    RtcpPsfbPacket,
    RtcpSrPacket,
    RtpPacket,
    is_rtcp,
    pack_remb_fci,
    unpack_remb_fci,
    unwrap_rtx,
)

log = logging.getLogger(__name__)

PINNED_AIORTC = "1.16.0"
NTP_UNIX_OFFSET_S = 2_208_988_800

__all__ = [
    "PINNED_AIORTC",
    "RTCP_PSFB_APP",
    "RTCP_PSFB_FIR",
    "RTCP_PSFB_PLI",
    "RtcpPsfbPacket",
    "RtcpSrPacket",
    "RtpPacket",
    "check_internals",
    "pack_remb_fci",
    "unpack_remb_fci",
    "unwrap_rtx",
]

RtpHandler = Callable[[RtpPacket, int], Awaitable[None]]
RtcpHandler = Callable[[AnyRtcpPacket], Awaitable[None]]


class InternalsMoved(RuntimeError):
    """aiortc no longer has an internal the SFU forwards media with."""


# --------------------------------------------------------------------------- the list

_METHODS: list[tuple[type, str, tuple[str, ...], bool]] = [
    # (class, method, its parameters, whether it is a coroutine function)
    (RTCRtpReceiver, "_handle_rtp_packet", ("self", "packet", "arrival_time_ms"), True),
    (RTCRtpReceiver, "_handle_rtcp_packet", ("self", "packet"), True),
    (RTCRtpReceiver, "_send_rtcp", ("self", "packet"), True),
    (RTCRtpReceiver, "_send_rtcp_pli", ("self", "media_ssrc"), True),
    (RTCRtpReceiver, "_send_rtcp_nack", ("self", "media_ssrc", "lost"), True),
    (RTCRtpReceiver, "_RTCRtpReceiver__stop_decoder", ("self",), False),
    (RTCRtpSender, "_handle_rtcp_packet", ("self", "packet"), True),
    (RTCDtlsTransport, "_handle_rtp_data", ("self", "data", "arrival_time_ms"), True),
    (aioice.Connection, "data_received", ("self", "data", "component"), False),
    (
        aioice.Connection,
        "get_component_candidates",
        ("self", "component", "addresses", "timeout"),
        True,
    ),
    (RateCounter, "add", ("self", "value", "now_ms"), False),
    (RateCounter, "rate", ("self", "now_ms"), False),
    (OveruseEstimator, "update_min_frame_period", ("self", "ts_delta"), False),
]

_RECEIVER_ATTRS: dict[str, type] = {
    "_RTCRtpReceiver__codecs": dict,
    "_RTCRtpReceiver__remote_bitrate_estimator": RemoteBitrateEstimator,
    "_RTCRtpReceiver__nack_generator": NackGenerator,
    "_RTCRtpReceiver__remote_streams": dict,
    "_RTCRtpReceiver__rtcp_ssrc": int,
    "_enabled": bool,
    "_RTCRtpReceiver__rtx_ssrc": dict,
    "_RTCRtpReceiver__decoder_thread": object,
}
_SENDER_ATTRS: dict[str, type] = {
    "_RTCRtpSender__rtp_history": dict,
    "_RTCRtpSender__rtp_header_extensions_map": aiortc_rtp.HeaderExtensionsMap,
    "_RTCRtpSender__mid": object,
    "_RTCRtpSender__ntp_timestamp": int,
    "_RTCRtpSender__rtp_timestamp": int,
    "_RTCRtpSender__octet_count": int,
    "_RTCRtpSender__packet_count": int,
}
_TRANSCEIVER_ATTRS: dict[str, type] = {"_codecs": list, "_offerDirection": str}
_DTLS_ATTRS: dict[str, type] = {
    "_state": DtlsState,
    "_tx_srtp": object,
    "_rx_srtp": object,
    "_RTCDtlsTransport__tx_bytes": int,
    "_RTCDtlsTransport__tx_packets": int,
    "_RTCDtlsTransport__rx_bytes": int,
    "_RTCDtlsTransport__rx_packets": int,
    "_rtp_router": object,
    "_rtp_header_extensions_map": aiortc_rtp.HeaderExtensionsMap,
}


async def check_internals() -> None:
    """Raise :class:`InternalsMoved` naming every internal that is missing or changed."""
    problems: list[str] = []
    if aiortc.__version__ != PINNED_AIORTC:
        problems.append(f"aiortc is {aiortc.__version__}, the SFU was verified on {PINNED_AIORTC}")
    for cls, name, params, coroutine in _METHODS:
        method = getattr(cls, name, None)
        if method is None or not callable(method):
            problems.append(f"{cls.__name__}.{name} is gone")
            continue
        found = tuple(inspect.signature(method).parameters)
        if found != params:
            problems.append(f"{cls.__name__}.{name}{found} is not {params}")
        if inspect.iscoroutinefunction(method) != coroutine:
            problems.append(
                f"{cls.__name__}.{name} is "
                + ("no longer" if coroutine else "now")
                + " a coroutine function"
            )
    if getattr(aiortc_icetransport, "Connection", None) not in (
        aioice.Connection,
        _HostCandidatesConnection,
    ):
        problems.append("aiortc.rtcicetransport no longer builds an aioice.Connection")
    if not isinstance(getattr(aioice_turn, "UDP_SOCKET_BUFFER_SIZE", None), int):
        problems.append("aioice.turn.UDP_SOCKET_BUFFER_SIZE is gone")
    if not isinstance(getattr(aioice.Connection(ice_controlling=False), "_protocols", None), list):
        problems.append("aioice.Connection._protocols is gone")
    for attr in ("StunProtocol",):
        if not hasattr(aioice_ice, attr):
            problems.append(f"aioice.ice.{attr} is gone")
    if not isinstance(getattr(aiortc_rate, "MIN_FRAME_PERIOD_HISTORY_LENGTH", None), int):
        problems.append("aiortc.rate.MIN_FRAME_PERIOD_HISTORY_LENGTH is gone")
    if not isinstance(RTP_HISTORY_SIZE, int) or RTP_HISTORY_SIZE < 64:
        problems.append("aiortc.rtp.RTP_HISTORY_SIZE changed")
    estimator = RemoteBitrateEstimator()
    pc = RTCPeerConnection()
    try:
        transceiver = pc.addTransceiver("video")
        for owner, attrs in (
            (transceiver.receiver, _RECEIVER_ATTRS),
            (transceiver.sender, _SENDER_ATTRS),
            (transceiver, _TRANSCEIVER_ATTRS),
            (transceiver.sender.transport, _DTLS_ATTRS),
            (transceiver.sender.transport.transport, {"_connection": aioice.Connection}),
            (
                transceiver.sender.transport.transport._connection,
                {"_nominated": dict, "_queue": asyncio.Queue},
            ),
            (estimator, {"incoming_bitrate": RateCounter, "estimator": OveruseEstimator}),
            (estimator.incoming_bitrate, {"_window_size": int, "_scale": int}),
            (estimator.estimator, {"ts_delta_hist": list}),
        ):
            for attr, kind in attrs.items():
                if not hasattr(owner, attr):
                    problems.append(f"{type(owner).__name__}.{attr} is gone")
                elif (
                    not isinstance(getattr(owner, attr), kind) and getattr(owner, attr) is not None
                ):
                    problems.append(f"{type(owner).__name__}.{attr} is no longer a {kind.__name__}")
    finally:
        await pc.close()
    if problems:
        raise InternalsMoved(
            "aiortc internals the SFU relies on have moved (see services/media/"
            "aiortc_internals.py): " + "; ".join(problems)
        )


# --------------------------------------------------------------------------- receiver side


REMB_INTERVAL_MS = 200
REMB_DROP = 0.97


class _RembThrottle:
    """libwebrtc's REMB throttle: a REMB at most every ``REMB_INTERVAL_MS``, unless the
    estimate fell under ``REMB_DROP`` of the last one sent. aiortc's estimator returns one
    every 500 ms, but on every packet while it detects overuse."""

    __slots__ = ("_bitrate", "_sent_at_ms")

    def __init__(self) -> None:
        self._bitrate = 0
        self._sent_at_ms: int | None = None

    def __call__(self, bitrate: int, now_ms: int) -> bool:
        if (
            self._sent_at_ms is not None
            and now_ms - self._sent_at_ms < REMB_INTERVAL_MS
            and bitrate >= self._bitrate * REMB_DROP
        ):
            return False
        self._bitrate, self._sent_at_ms = bitrate, now_ms
        return True


class WindowRate(RateCounter):
    """aiortc's ``RateCounter`` (the rate over the last ``window_size`` ms, from 1 ms
    buckets) keeping only the milliseconds that had packets, in order: aiortc clears its
    ring of buckets one millisecond at a time, so each packet paid a loop turn for every
    millisecond since the last one (twice: ``rate`` then ``add``). The same figures for
    arrival times that do not go backwards (the estimator's, from one clock)."""

    def reset(self) -> None:
        self._entries: deque[list[int]] = deque()  # [ms, count, value], oldest first
        self._origin_ms: int | None = None
        self._count = 0
        self._value = 0

    def add(self, value: int, now_ms: int) -> None:
        if self._origin_ms is None:
            self._origin_ms = now_ms
        else:
            self._erase_old(now_ms)
        entries = self._entries
        if entries and entries[-1][0] == now_ms:
            last = entries[-1]
            last[1] += 1
            last[2] += value
        else:
            entries.append([now_ms, 1, value])
        self._count += 1
        self._value += value

    def rate(self, now_ms: int) -> int | None:
        if self._origin_ms is not None:
            self._erase_old(now_ms)
            active_window_size = now_ms - self._origin_ms + 1
            if self._count > 0 and active_window_size > 1:
                return round(self._scale * self._value / active_window_size)
        return None

    def _erase_old(self, now_ms: int) -> None:
        new_origin_ms = now_ms - self._window_size + 1
        assert self._origin_ms is not None
        if self._origin_ms < new_origin_ms:
            entries = self._entries
            while entries and entries[0][0] < new_origin_ms:
                _, count, value = entries.popleft()
                self._count -= count
                self._value -= value
            self._origin_ms = new_origin_ms


def speed_up_estimator(estimator: RemoteBitrateEstimator) -> None:
    """The same estimate for less: its incoming bitrate a :class:`WindowRate`, and the
    overuse estimator's smallest frame period of the last
    ``MIN_FRAME_PERIOD_HISTORY_LENGTH`` from the builtin ``min`` (aiortc loops in Python,
    calling ``min`` once per entry, for every frame). Call before its first packet."""
    counter: RateCounter = estimator.incoming_bitrate
    estimator.incoming_bitrate = WindowRate(counter._window_size, counter._scale)
    overuse = estimator.estimator

    def update_min_frame_period(ts_delta: float) -> float:
        history: list[float] = overuse.ts_delta_hist
        if len(history) >= aiortc_rate.MIN_FRAME_PERIOD_HISTORY_LENGTH:
            del history[0]
        smallest = min(history, default=ts_delta)
        history.append(ts_delta)
        return ts_delta if ts_delta < smallest else smallest

    overuse.update_min_frame_period = update_min_frame_period  # type: ignore[method-assign]


def tap_receiver_rtp(receiver: RTCRtpReceiver, before: Callable[[RtpPacket], None]) -> None:
    """Call ``before(packet)`` for every RTP packet, then what the SFU keeps of aiortc's
    own handling: the bitrate estimate (REMB, throttled), the statistics of the receiver
    reports and, for video, the NACK generator (on the repaired packet, for RTX).

    The handling is synchronous (:func:`receive_directly` calls it from the socket's
    callback); the RTCP it sends now and then (a REMB, a NACK) goes out in a task."""
    codecs = receiver_codecs(receiver)
    rtx_ssrcs = receiver_rtx_ssrcs(receiver)
    streams: dict[int, StreamStatistics] = receiver._RTCRtpReceiver__remote_streams  # type: ignore[attr-defined]
    estimator: RemoteBitrateEstimator | None = receiver._RTCRtpReceiver__remote_bitrate_estimator  # type: ignore[attr-defined]
    nacks: NackGenerator | None = receiver._RTCRtpReceiver__nack_generator  # type: ignore[attr-defined]
    remb_due = _RembThrottle()
    if estimator is not None:
        speed_up_estimator(estimator)

    def handle_now(packet: RtpPacket, arrival_time_ms: int) -> None:
        before(packet)
        if not receiver._enabled:
            return
        if estimator is not None and packet.extensions.abs_send_time is not None:
            remb = estimator.add(
                abs_send_time=packet.extensions.abs_send_time,
                arrival_time_ms=arrival_time_ms,
                payload_size=len(packet.payload) + packet.padding_size,
                ssrc=packet.ssrc,
            )
            rtcp_ssrc = receiver._RTCRtpReceiver__rtcp_ssrc  # type: ignore[attr-defined]
            if rtcp_ssrc is not None and remb is not None and remb_due(remb[0], arrival_time_ms):
                _in_background(
                    receiver._send_rtcp(
                        RtcpPsfbPacket(
                            fmt=RTCP_PSFB_APP,
                            ssrc=rtcp_ssrc,
                            media_ssrc=0,
                            fci=pack_remb_fci(*remb),
                        )
                    )
                )
        codec = codecs.get(packet.payload_type)
        if codec is None:
            return
        stream = streams.get(packet.ssrc)
        if stream is None:
            stream = streams[packet.ssrc] = StreamStatistics(codec.clockRate)
        stream.add(packet)
        if nacks is None:
            return
        if codec.name == "rtx":
            if (repaired := repaired_packet(packet, codec, codecs, rtx_ssrcs)) is None:
                return
            packet = repaired
        if nacks.add(packet):
            _in_background(receiver._send_rtcp_nack(packet.ssrc, sorted(nacks.missing)))

    async def handle(packet: RtpPacket, arrival_time_ms: int) -> None:
        handle_now(packet, arrival_time_ms)

    receiver._handle_rtp_packet = handle  # type: ignore[method-assign]
    receiver._dmcall_handle_now = handle_now  # type: ignore[attr-defined]


_BACKGROUND: set[asyncio.Task[None]] = set()


def _in_background(coro: Coroutine[Any, Any, None]) -> None:
    """Run an RTCP send the synchronous path asked for (held until done: the loop keeps
    only a weak reference to a task)."""
    task = asyncio.get_running_loop().create_task(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


def tap_rtcp(
    endpoint: RTCRtpReceiver | RTCRtpSender, before: Callable[[AnyRtcpPacket], None]
) -> None:
    """Call ``before(packet)`` for RTCP the receiver (a publisher's sender reports) or the
    sender (a subscriber's PLI, FIR, REMB) gets, then aiortc's own handling (it still
    answers NACKs)."""
    original: RtcpHandler = endpoint._handle_rtcp_packet

    async def handle(packet: AnyRtcpPacket) -> None:
        before(packet)
        await original(packet)

    endpoint._handle_rtcp_packet = handle  # type: ignore[method-assign]


def tap_receiver_outgoing_rtcp(
    receiver: RTCRtpReceiver, rewrite: Callable[[AnyRtcpPacket], AnyRtcpPacket]
) -> None:
    """Let ``rewrite`` replace any RTCP packet the receiver sends (the SFU's REMB)."""
    original: RtcpHandler = receiver._send_rtcp

    async def send(packet: AnyRtcpPacket) -> None:
        await original(rewrite(packet))

    receiver._send_rtcp = send  # type: ignore[method-assign]


def stop_decoder(receiver: RTCRtpReceiver) -> None:
    """Stop (and never start again) the receiver's decoder thread: nothing is decoded."""
    if receiver._RTCRtpReceiver__decoder_thread is not None:  # type: ignore[attr-defined]
        receiver._RTCRtpReceiver__stop_decoder()  # type: ignore[attr-defined]


def receiver_codecs(receiver: RTCRtpReceiver) -> dict[int, RTCRtpCodecParameters]:
    codecs: dict[int, RTCRtpCodecParameters] = receiver._RTCRtpReceiver__codecs  # type: ignore[attr-defined]
    return codecs


def receiver_rtx_ssrcs(receiver: RTCRtpReceiver) -> dict[int, int]:
    """RTX ssrc -> the media ssrc it repairs, from the remote description."""
    ssrcs: dict[int, int] = receiver._RTCRtpReceiver__rtx_ssrc  # type: ignore[attr-defined]
    return ssrcs


def repaired_packet(
    packet: RtpPacket,
    codec: RTCRtpCodecParameters,
    codecs: dict[int, RTCRtpCodecParameters],
    rtx_ssrcs: dict[int, int],
) -> RtpPacket | None:
    """The packet an RTX one (``codec`` is rtx) carries; None if it repairs no known stream."""
    apt = codec.parameters.get("apt")
    original_ssrc = rtx_ssrcs.get(packet.ssrc)
    if original_ssrc is None or len(packet.payload) < 2 or apt not in codecs:
        return None
    return unwrap_rtx(packet, payload_type=apt, ssrc=original_ssrc)  # type: ignore[arg-type]


async def send_pli(receiver: RTCRtpReceiver, media_ssrc: int) -> None:
    await receiver._send_rtcp_pli(media_ssrc)


# --------------------------------------------------------------------------- sender side


def abs_send_time() -> int:
    """Now as the abs-send-time extension has it: NTP seconds in 6.18 fixed point, 24 bits.

    aiortc's sender computes ``(clock.current_ntp_time() >> 14) & 0xFFFFFF`` through
    datetime objects (~2 us a packet); this is the same value from ``time.time()``."""
    return int((time.time() + NTP_UNIX_OFFSET_S) * 262_144) & 0xFFFFFF


def now_ms() -> int:
    """Now as aiortc's ``clock.current_ms()`` has it (milliseconds since the NTP epoch),
    which it computes through datetime objects."""
    return int((time.time() + NTP_UNIX_OFFSET_S) * 1000)


class ExtensionsLayout:
    """Where a forwarded packet's varying header extensions sit in the extension block
    (profile and length words included) a sender's map makes of ``mid`` plus
    abs-send-time, and optionally the audio level: learned from aiortc's own
    ``HeaderExtensionsMap.set`` (three probes whose varying fields differ), so that a
    packet's block is this template with three bytes (and one) written in. Which form
    (one- or two-byte headers) and which ids are used depends on the ids and lengths
    only, never on the values."""

    __slots__ = ("abs_send_time_at", "audio_level_at", "template")

    def __init__(self, extensions: aiortc_rtp.HeaderExtensionsMap, mid: str | None, level: bool):
        def block(send_time: int, audio_level: tuple[bool, int]) -> bytes:
            values = aiortc_rtp.HeaderExtensions()
            values.mid = mid
            values.abs_send_time = send_time
            if level:
                values.audio_level = audio_level
            profile, value = extensions.set(values)
            return pack("!HH", profile, len(value) >> 2) + value if value else b""

        low, high, time_only = (
            block(0, (False, 0)),
            block(0xFFFFFF, (True, 0x7F)),
            block(0xFFFFFF, (False, 0)),
        )
        if not len(low) == len(high) == len(time_only):  # pragma: no cover - aiortc's contract
            raise InternalsMoved("the header extension block's size depends on its values")
        changed = [i for i in range(len(low)) if low[i] != high[i]]
        send_time_bytes = [i for i in changed if low[i] != time_only[i]]
        level_bytes = [i for i in changed if i not in send_time_bytes]
        self.template = low
        self.abs_send_time_at = send_time_bytes[0] if len(send_time_bytes) == 3 else None
        self.audio_level_at = level_bytes[0] if len(level_bytes) == 1 else None


class PacketWriter:
    """Serializes forwarded packets as ``packet.serialize(extensions)`` would for a
    sender whose mid is ``mid``: the extension block comes from a template (see
    :class:`ExtensionsLayout`) with the packet's abs-send-time and audio level written
    in, instead of being built anew through aiortc's generic map for every packet."""

    __slots__ = ("_extensions", "_layouts", "_mid")

    def __init__(self, extensions: aiortc_rtp.HeaderExtensionsMap, mid: str | None) -> None:
        self._extensions = extensions
        self._mid = mid
        self._layouts = (
            ExtensionsLayout(extensions, mid, level=False),
            ExtensionsLayout(extensions, mid, level=True),
        )

    def serialize(self, packet: RtpPacket) -> bytes:
        extensions = packet.extensions
        if (
            packet.csrc
            or extensions.mid != self._mid
            or extensions.abs_send_time is None
            or extensions.repaired_rtp_stream_id is not None
            or extensions.rtp_stream_id is not None
            or extensions.transmission_offset is not None
            or extensions.transport_sequence_number is not None
        ):
            return packet.serialize(self._extensions)  # not a packet the templates cover
        audio_level = extensions.audio_level
        layout = self._layouts[audio_level is not None]
        block: bytes | bytearray = layout.template
        at = layout.abs_send_time_at
        level_at = layout.audio_level_at
        if at is not None or (level_at is not None and audio_level is not None):
            written = bytearray(block)
            if at is not None:
                written[at : at + 3] = (extensions.abs_send_time & 0xFFFFFF).to_bytes(3, "big")
            if level_at is not None and audio_level is not None:
                written[level_at] = (0x80 if audio_level[0] else 0) | (audio_level[1] & 0x7F)
            block = written
        padding = packet.padding_size
        head = pack(
            "!BBHLL",
            0x80 | (0x20 if padding else 0) | (0x10 if block else 0),
            (packet.marker << 7) | packet.payload_type,
            packet.sequence_number,
            packet.timestamp,
            packet.ssrc,
        )
        if padding:
            return b"".join((head, block, packet.payload, bytes(padding - 1), bytes((padding,))))
        return b"".join((head, block, packet.payload))


class SenderPort:
    """Sends forwarded packets as if ``sender`` had produced them itself."""

    __slots__ = (
        "_extensions",
        "_history",
        "_mid",
        "_route",
        "_sender",
        "_transport",
        "_writer",
        "ssrc",
    )

    def __init__(self, sender: RTCRtpSender) -> None:
        self._sender = sender
        self.ssrc: int = sender._ssrc
        self._history: dict[int, RtpPacket] = sender._RTCRtpSender__rtp_history  # type: ignore[attr-defined]
        self._extensions: aiortc_rtp.HeaderExtensionsMap = (
            sender._RTCRtpSender__rtp_header_extensions_map  # type: ignore[attr-defined]
        )
        self._mid: str | None = sender._RTCRtpSender__mid  # type: ignore[attr-defined]
        self._transport: RTCDtlsTransport = sender.transport
        self._writer: PacketWriter | None = None
        self._route: tuple[Any, Callable[[bytes, Any], None], tuple[str, int]] | None = None
        """The nominated pair it was read from, its socket's ``sendto``, the address."""

    def refresh(self) -> None:
        """Re-read what ``RTCRtpSender.send()`` configures (mid, extension ids)."""
        self._mid = self._sender._RTCRtpSender__mid  # type: ignore[attr-defined]
        self._transport = self._sender.transport
        self._writer = None
        self._route = None

    @property
    def started(self) -> bool:
        return self._mid is not None

    def send(self, packet: RtpPacket) -> None:
        """Raises ConnectionError while the subscriber's transport is not connected."""
        packet.ssrc = self.ssrc
        extensions = packet.extensions
        extensions.mid = self._mid
        extensions.abs_send_time = abs_send_time()
        self._history[packet.sequence_number % RTP_HISTORY_SIZE] = packet
        writer = self._writer
        if writer is None:
            writer = self._writer = PacketWriter(self._extensions, self._mid)
        data = writer.serialize(packet)
        sender = self._sender
        sender._RTCRtpSender__octet_count += len(packet.payload)  # type: ignore[attr-defined]
        sender._RTCRtpSender__packet_count += 1  # type: ignore[attr-defined]
        self._send(data)

    def _send(self, data: bytes) -> None:
        """``RTCDtlsTransport._send_rtp(data)`` for an RTP packet without its five
        coroutines (it awaits aioice's ``Connection.send`` -> ``sendto`` ->
        ``StunProtocol.send_data``, none of which waits): SRTP-protect and ``sendto`` on
        the nominated pair's socket (looked up again only when the pair changes), counted
        in the transport's statistics."""
        transport = self._transport
        if transport._state != DtlsState.CONNECTED:
            raise ConnectionError("Cannot send encrypted RTP, not connected")
        pair = transport.transport._connection._nominated.get(1)
        if pair is None:
            raise ConnectionError("Cannot send data, not connected")
        route = self._route
        if route is None or route[0] is not pair:
            route = self._route = (pair, pair.protocol.transport.sendto, pair.remote_addr)
        data = transport._tx_srtp.protect(data)
        route[1](data, route[2])
        transport._RTCDtlsTransport__tx_bytes += len(data)  # type: ignore[attr-defined]
        transport._RTCDtlsTransport__tx_packets += 1  # type: ignore[attr-defined]

    def set_sender_report(self, ntp_timestamp: int, rtp_timestamp: int) -> None:
        """What the sender's next RTCP SR says: the publisher's own NTP/RTP pair."""
        self._sender._RTCRtpSender__ntp_timestamp = ntp_timestamp  # type: ignore[attr-defined]
        self._sender._RTCRtpSender__rtp_timestamp = rtp_timestamp  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- transport


def _rtp_or_rtcp(data: bytes) -> bool:
    """RFC 7983's demultiplexing: a first byte of 128-191 is RTP or RTCP (STUN's is 0-3,
    DTLS's 20-63); an empty datagram is none of them."""
    return bool(data) and 127 < data[0] < 192


def receive_directly(transport: RTCDtlsTransport, stamp: Callable[[], None]) -> None:
    """Handle each SRTP packet of ``transport`` in its socket's callback, and call
    ``stamp()`` as it arrives, before it is parsed and routed.

    aiortc's way is a hop through two queues' worth of coroutines per packet: aioice
    parses the datagram as STUN (raising for every RTP packet), puts it on its
    ``Connection``'s queue, and the DTLS transport's receive task wakes up to take it,
    unprotect it, parse it and await the receiver's handler. Here a datagram whose first
    byte says RTP (128-191, RFC 7983; RTCP is told apart by its payload type) is unprotected,
    parsed, routed and handled at once, synchronously, as aiortc's
    ``RTCDtlsTransport._recv_next`` would with the same state (its statistics, its SRTP
    session, its router). Everything else takes aiortc's path: STUN, DTLS, RTCP, and RTP
    while the DTLS handshake is not done or while earlier datagrams wait in the queue (so
    packets are never reordered). Receivers the SFU tapped (:func:`tap_receiver_rtp`) are
    handled synchronously; any other receiver's handler runs in a task, as before. A
    packet whose handling raises is logged and dropped: the socket goes on. An empty
    datagram, which anyone can send the socket and aiortc's receive task dies of (it
    reads its first byte), is dropped."""
    if getattr(transport, "_dmcall_tapped", False):
        return
    original: Callable[[bytes, int], Awaitable[None]] = transport._handle_rtp_data

    async def handle(data: bytes, arrival_time_ms: int) -> None:
        stamp()
        await original(data, arrival_time_ms)

    transport._handle_rtp_data = handle  # type: ignore[method-assign]
    connection: aioice.Connection = transport.transport._connection
    queue: asyncio.Queue[tuple[bytes, int] | None] = connection._queue
    queued = connection.data_received

    failures = 0

    def receive(srtp: Any, data: bytes) -> None:
        transport._RTCDtlsTransport__rx_bytes += len(data)  # type: ignore[attr-defined]
        transport._RTCDtlsTransport__rx_packets += 1  # type: ignore[attr-defined]
        arrival_time_ms = now_ms()
        try:
            data = srtp.unprotect(data)
        except pylibsrtp.Error:
            return  # aiortc drops it too
        stamp()
        try:
            packet = RtpPacket.parse(data, transport._rtp_header_extensions_map)
        except ValueError:
            return
        receiver = transport._rtp_router.route_rtp(packet)
        if receiver is None:
            return
        handle_now = getattr(receiver, "_dmcall_handle_now", None)
        if handle_now is not None:
            handle_now(packet, arrival_time_ms)
        else:
            _in_background(receiver._handle_rtp_packet(packet, arrival_time_ms=arrival_time_ms))

    def data_received(data: bytes, component: int) -> None:
        nonlocal failures
        if not data:
            return  # no protocol's: aiortc's receive task would die of it (data[0])
        srtp = transport._rx_srtp
        if srtp is None or not _rtp_or_rtcp(data) or is_rtcp(data) or not queue.empty():
            queued(data, component)
            return
        try:
            receive(srtp, data)
        except Exception:
            # Not into the socket's callback, whose loop would log it for every packet
            # (aiortc's receive task would have died of it): logged now and then, dropped.
            failures += 1
            if failures == 1 or failures % 1000 == 0:
                log.exception("an RTP packet could not be handled (%d so far); dropped", failures)

    connection.data_received = data_received  # type: ignore[method-assign]
    transport._dmcall_tapped = True  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- negotiation


def negotiated_codecs(transceiver: RTCRtpTransceiver) -> list[RTCRtpCodecParameters]:
    codecs: list[RTCRtpCodecParameters] = transceiver._codecs
    return codecs


def offered_direction(transceiver: RTCRtpTransceiver) -> str | None:
    """After the remote offer: the direction it asks of this (answering) side, as aiortc
    keeps it (the offer's direction reversed: ``sendonly`` for a ``recvonly`` section)."""
    direction: str | None = transceiver._offerDirection
    return direction


def force_codecs(transceiver: RTCRtpTransceiver, codecs: list[RTCRtpCodecParameters]) -> None:
    """Call after setRemoteDescription, before createAnswer: the answer offers only these."""
    transceiver._codecs = codecs


# --------------------------------------------------------------------------- ICE (aioice)
# aioice binds host candidates to port 0 on every interface but loopback. To run behind
# NAT or on Kubernetes a node needs a UDP port range and a chosen set of interfaces, so
# aiortc's ICE connection class is replaced by a subclass that gathers host candidates on
# ``ice_addresses`` (if set) within ``port_range`` (if set). The SFU uses no STUN/TURN
# server: its public address is announced by rewriting the answer (see services/media/
# sdp.py), so only host candidates are gathered here.


class _DemuxStunProtocol(aioice_ice.StunProtocol):
    """aioice's socket protocol, which first tries every datagram as STUN (raising and
    catching a ValueError for each RTP packet); a datagram whose first byte is 128-191
    (RTP or RTCP, RFC 7983: STUN's is 0-3) goes straight to the connection, which is what
    aioice does with it after that failed parse."""

    def datagram_received(self, data: bytes | str, addr: tuple[Any, ...]) -> None:
        if isinstance(data, bytes) and _rtp_or_rtcp(data):
            self.receiver.data_received(data, self.local_candidate.component)
            return
        super().datagram_received(data, addr)


class _HostCandidatesConnection(aioice.Connection):
    port_range: tuple[int, int] | None = None
    addresses: tuple[str, ...] = ()

    async def get_component_candidates(
        self,
        component: int,
        addresses: list[str],
        timeout: int = 5,  # noqa: ASYNC109
    ) -> list[aioice.Candidate]:
        if self.addresses:
            addresses = list(self.addresses)
        if self.port_range is None or self.stun_server or self.turn_server:
            return await super().get_component_candidates(component, addresses, timeout)
        loop = asyncio.get_running_loop()
        candidates: list[aioice.Candidate] = []
        for address in addresses:
            protocol = await _bind_in_range(
                loop, lambda: aioice_ice.StunProtocol(self), address, self.port_range
            )
            if protocol is None:
                continue
            host, port = protocol.transport.get_extra_info("sockname")[:2]
            protocol.local_candidate = aioice.Candidate(
                foundation=candidate_foundation("host", "udp", host),
                component=component,
                transport="udp",
                priority=candidate_priority(component, "host"),
                host=host,
                port=port,
                type="host",
            )
            self._protocols.append(protocol)
            candidates.append(protocol.local_candidate)
        return candidates


async def _bind_in_range(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], aioice_ice.StunProtocol],
    address: str,
    port_range: tuple[int, int],
) -> aioice_ice.StunProtocol | None:
    low, high = port_range
    ports = list(range(low, high + 1))
    start = random.randrange(len(ports))
    for port in ports[start:] + ports[:start]:
        try:
            transport, protocol = await loop.create_datagram_endpoint(
                factory, local_addr=(address, port)
            )
        except OSError:
            continue
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, aioice_turn.UDP_SOCKET_BUFFER_SIZE)
        return protocol
    return None


def configure_ice(
    port_range: tuple[int, int] | None, addresses: list[str], receive_buffer_bytes: int
) -> None:
    """Process-wide (one process is one node): where host candidates are gathered, and
    how much each UDP socket buffers while the event loop is busy elsewhere (aioice's
    ``turn.UDP_SOCKET_BUFFER_SIZE``, read when a socket is made; the kernel caps it at
    ``net.core.rmem_max``)."""
    aioice_turn.UDP_SOCKET_BUFFER_SIZE = receive_buffer_bytes
    aioice_ice.StunProtocol = _DemuxStunProtocol  # type: ignore[misc]
    _HostCandidatesConnection.port_range = port_range
    _HostCandidatesConnection.addresses = tuple(addresses)
    aiortc_icetransport.Connection = _HostCandidatesConnection  # type: ignore[misc]
