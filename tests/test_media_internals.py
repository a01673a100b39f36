"""The aiortc internals the SFU forwards with, and its pure pieces (no I/O).

If ``test_the_aiortc_internals_the_sfu_relies_on_are_there`` fails, an aiortc upgrade
moved something services/media/aiortc_internals.py names: media would stop flowing.
"""

from __future__ import annotations

import pytest

from services.media import aiortc_internals
from services.media.aiortc_internals import RtpPacket, check_internals
from services.media.delays import DelayRecorder
from services.media.forwarder import Forwarder, is_h264_keyframe_start, is_vp8_keyframe_start
from services.media.sdp import announce_public_ip
from services.media.settings import MediaSettings


async def test_the_aiortc_internals_the_sfu_relies_on_are_there() -> None:
    await check_internals()


async def test_a_moved_internal_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiortc import RTCRtpReceiver

    monkeypatch.delattr(RTCRtpReceiver, "_send_rtcp_pli")
    with pytest.raises(aiortc_internals.InternalsMoved, match="_send_rtcp_pli is gone"):
        await check_internals()


def test_abs_send_time_is_aiortcs() -> None:
    from aiortc import clock

    theirs = (clock.current_ntp_time() >> 14) & 0xFFFFFF
    ours = aiortc_internals.abs_send_time()
    assert abs(ours - theirs) % 0xFFFFFF < 262  # under a millisecond apart


VP8_KEY = bytes([0x90, 0x80, 0x05, 0x10, 0x02, 0x00])  # X, S, picture id; P bit 0
VP8_DELTA = bytes([0x90, 0x80, 0x05, 0x11, 0x02, 0x00])  # P bit 1
VP8_MIDDLE = bytes([0x80, 0x80, 0x05, 0x10])  # not the start of a partition


def test_vp8_keyframe_start_is_read_from_the_headers_only() -> None:
    assert is_vp8_keyframe_start(VP8_KEY)
    assert not is_vp8_keyframe_start(VP8_DELTA)
    assert not is_vp8_keyframe_start(VP8_MIDDLE)
    assert not is_vp8_keyframe_start(b"")
    assert is_vp8_keyframe_start(bytes([0x10, 0x00]))  # no extension


def test_h264_keyframe_start() -> None:
    assert is_h264_keyframe_start(bytes([0x65, 0x00]))  # IDR
    assert is_h264_keyframe_start(bytes([0x18, 0x00, 0x02, 0x67, 0x00]))  # STAP-A with SPS
    assert is_h264_keyframe_start(bytes([0x7C, 0x85]))  # FU-A start of an IDR
    assert not is_h264_keyframe_start(bytes([0x7C, 0x05]))  # FU-A, not the start
    assert not is_h264_keyframe_start(bytes([0x41, 0x00]))  # non-IDR slice


class FakePort:
    """Stands in for the subscriber's sender; records what would be sent."""

    def __init__(self) -> None:
        self.sent: list[RtpPacket] = []
        self.ssrc = 1234
        self.started = True

    def refresh(self) -> None:
        pass

    def send(self, packet: RtpPacket) -> None:
        self.sent.append(packet)


def _packet(seq: int, ts: int, payload: bytes, ssrc: int = 99, pt: int = 96) -> RtpPacket:
    return RtpPacket(payload_type=pt, sequence_number=seq, timestamp=ts, ssrc=ssrc, payload=payload)


def test_video_waits_for_a_keyframe_and_stays_continuous_across_publishers() -> None:
    port = FakePort()
    requests: list[int] = []
    forwarder = Forwarder(
        kind="video",
        port=port,  # type: ignore[arg-type]
        payload_types={96: 120},
        keyframe_detector=is_vp8_keyframe_start,
        request_keyframe=lambda: requests.append(1),
        delays=DelayRecorder(window=16),
    )
    forwarder.forward(_packet(65534, 1000, VP8_DELTA), 0.0)
    assert port.sent == [] and requests == [1]  # held, keyframe asked for
    for seq, payload in ((65535, VP8_KEY), (0, b"\x00rest"), (1, VP8_DELTA)):
        forwarder.forward(_packet(seq, 2000, payload), 0.0)
    assert [p.payload for p in port.sent] == [VP8_KEY, b"\x00rest", VP8_DELTA]
    assert {p.payload_type for p in port.sent} == {120}
    assert {p.timestamp for p in port.sent} == {2000}
    first = port.sent[0].sequence_number
    assert [p.sequence_number for p in port.sent] == [first, first + 1, first + 2]
    assert forwarder.out_timestamp(99, 2000) == 2000  # the first source's, as they are
    # The publisher rejoins: a new ssrc, numbering and timestamp base; the subscriber sees
    # the next sequence number and a timestamp just past the last one (time went on).
    forwarder.forward(_packet(500, 9000, VP8_KEY, ssrc=77), 0.0)
    assert port.sent[-1].sequence_number == first + 3
    assert 2000 < port.sent[-1].timestamp < 2000 + 90_000
    shift = port.sent[-1].timestamp - 9000
    forwarder.forward(_packet(501, 12_000, VP8_DELTA, ssrc=77), 0.0)
    assert port.sent[-1].timestamp == 12_000 + shift
    # Its sender reports are translated the same way (lip sync); the old source's are not.
    assert forwarder.out_timestamp(77, 15_000) == 15_000 + shift
    assert forwarder.out_timestamp(99, 2000) is None


def test_public_ip_replaces_host_candidates() -> None:
    sdp = "v=0\r\nc=IN IP4 10.0.0.5\r\na=candidate:abc 1 udp 2130706431 10.0.0.5 40000 typ host\r\n"
    rewritten = announce_public_ip(sdp, "203.0.113.7")
    assert "203.0.113.7 40000 typ host" in rewritten
    assert "c=IN IP4 203.0.113.7" in rewritten and "10.0.0.5" not in rewritten
    assert announce_public_ip(sdp, None) == sdp


def test_delay_percentiles() -> None:
    recorder = DelayRecorder(window=100)
    for i in range(1, 101):
        recorder.record(i / 1000)
    p50, p99 = recorder.percentiles(0.5, 0.99)
    assert p50 == pytest.approx(0.050, abs=0.002) and p99 == pytest.approx(0.099, abs=0.002)


def test_udp_port_range_needs_both_bounds() -> None:
    with pytest.raises(ValueError, match="both"):
        MediaSettings(udp_port_min=40000)
    with pytest.raises(ValueError, match="above"):
        MediaSettings(udp_port_min=40010, udp_port_max=40000)
    assert MediaSettings(udp_port_min=40000, udp_port_max=40010).udp_port_range == (40000, 40010)
