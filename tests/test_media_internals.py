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


def test_every_forwarded_copy_is_counted_and_one_in_sample_every_is_timed() -> None:
    from services.media.delays import SAMPLE_EVERY

    port, delays = FakePort(), DelayRecorder(window=64)
    forwarder = Forwarder(
        kind="audio",
        port=port,  # type: ignore[arg-type]
        payload_types={111: 111},
        keyframe_detector=None,
        request_keyframe=lambda: None,
        delays=delays,
    )
    for seq in range(10 * SAMPLE_EVERY + 1):
        forwarder.forward(_packet(seq, seq * 960, b"opus", pt=111), arrived_at=0.0)
    assert len(port.sent) == delays.forwarded == 10 * SAMPLE_EVERY + 1
    assert delays.count == 10  # the timed ones
    (p50,) = delays.percentiles(0.5)
    assert p50 is not None and p50 > 0  # perf_counter() since 0.0: long


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


def _extensions_map(*uris_ids: tuple[str, int]) -> object:
    from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
    from aiortc.rtp import HeaderExtensionsMap

    extensions = HeaderExtensionsMap()
    extensions.configure(
        RTCRtpParameters(
            headerExtensions=[RTCRtpHeaderExtensionParameters(id=i, uri=u) for u, i in uris_ids]
        )
    )
    return extensions


MID = "urn:ietf:params:rtp-hdrext:sdes:mid"
ABS_SEND_TIME = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
AUDIO_LEVEL = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"


@pytest.mark.parametrize(
    "extension_ids",
    [
        ((MID, 4), (ABS_SEND_TIME, 2), (AUDIO_LEVEL, 1)),  # what browsers negotiate
        ((MID, 1), (ABS_SEND_TIME, 3)),  # video: no audio level
        ((MID, 9), (AUDIO_LEVEL, 10), (ABS_SEND_TIME, 15)),  # an id > 14: two-byte headers
        ((AUDIO_LEVEL, 1),),  # neither mid nor abs-send-time negotiated
        (),  # no extensions at all
    ],
)
@pytest.mark.parametrize("mid", ["0", "12", None])
def test_the_packet_writer_serializes_a_forwarded_packet_as_aiortc_does(
    extension_ids: tuple[tuple[str, int], ...], mid: str | None
) -> None:
    extensions = _extensions_map(*extension_ids)
    writer = aiortc_internals.PacketWriter(extensions, mid)  # type: ignore[arg-type]
    cases = 0
    for send_time in (0, 1, 0xABCDEF, 0xFFFFFF, 0x1234567):  # the last beyond 24 bits
        for level in (None, (False, 0), (True, 127), (True, 33)):
            for padding in (0, 1, 7):
                packet = RtpPacket(
                    payload_type=111,
                    marker=cases % 2,
                    sequence_number=65_535 - cases,
                    timestamp=(0xFFFF_FFF0 + cases) & 0xFFFF_FFFF,
                    ssrc=0xDEADBEEF,
                    payload=b"\x01\x02\x03",
                )
                packet.padding_size = padding
                packet.extensions.mid = mid
                packet.extensions.abs_send_time = send_time
                packet.extensions.audio_level = level
                ours = writer.serialize(packet)
                theirs = packet.serialize(extensions)  # type: ignore[arg-type]
                if padding:  # aiortc's padding bytes but the last are random
                    assert ours[:-padding] == theirs[:-padding] and ours[-1] == theirs[-1]
                else:
                    assert ours == theirs
                parsed = RtpPacket.parse(ours, extensions)  # type: ignore[arg-type]
                assert parsed.extensions.audio_level == (
                    level
                    if (AUDIO_LEVEL, 1) in extension_ids or (AUDIO_LEVEL, 10) in extension_ids
                    else None
                )
                cases += 1
    assert cases == 60


def test_the_packet_writer_leaves_what_its_templates_do_not_cover_to_aiortc() -> None:
    extensions = _extensions_map((MID, 4), (ABS_SEND_TIME, 2))
    writer = aiortc_internals.PacketWriter(extensions, "0")  # type: ignore[arg-type]
    packet = RtpPacket(payload_type=96, sequence_number=7, timestamp=9, ssrc=5, payload=b"x")
    packet.csrc = [1, 2]
    packet.extensions.mid = "0"
    packet.extensions.abs_send_time = 77
    assert writer.serialize(packet) == packet.serialize(extensions)  # type: ignore[arg-type]
    packet.csrc = []
    packet.extensions.mid = "3"  # not the writer's
    assert writer.serialize(packet) == packet.serialize(extensions)  # type: ignore[arg-type]


def _arrivals(seed: int, packets: int) -> list[tuple[int, int, int]]:
    """(arrival ms, abs-send-time, size) of a video stream as a receiver's clock sees it
    (never backwards): frames of 1-6 packets every ~33 ms with jitter, bursts, a
    congested stretch (growing delay) and long gaps."""
    import random

    rng = random.Random(seed)
    out: list[tuple[int, int, int]] = []
    sent_ms, delay_ms = 1_000_000.0, 5.0
    while len(out) < packets:
        sent_ms += rng.choice((33, 33, 33, 34, 0, 66)) + (2500 if rng.random() < 0.005 else 0)
        delay_ms = max(1.0, delay_ms + rng.uniform(-1, 1) + (3 if 300 < len(out) < 600 else 0))
        arrival = max(int(sent_ms + delay_ms), out[-1][0] if out else 0)  # in order
        for _ in range(rng.randint(1, 6)):
            arrival += rng.choice((0, 0, 1, 2))
            send_time = int(sent_ms / 1000 * 262_144) & 0xFFFFFF
            out.append((arrival, send_time, rng.randint(200, 1200)))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_sped_up_estimator_gives_aiortcs_estimates(seed: int) -> None:
    from aiortc.rate import RemoteBitrateEstimator

    theirs, ours = RemoteBitrateEstimator(), RemoteBitrateEstimator()
    aiortc_internals.speed_up_estimator(ours)
    estimates = 0
    for arrival, send_time, size in _arrivals(seed, 4000):
        expected = theirs.add(arrival, send_time, size, ssrc=7)
        assert ours.add(arrival, send_time, size, ssrc=7) == expected
        assert ours.incoming_bitrate.rate(arrival) == theirs.incoming_bitrate.rate(arrival)
        estimates += expected is not None
    assert estimates > 20  # it did estimate, on the way
    assert ours.estimator.ts_delta_hist == theirs.estimator.ts_delta_hist


def test_the_window_rate_forgets_what_left_the_window() -> None:
    from aiortc.rate import RateCounter

    ours, theirs = aiortc_internals.WindowRate(1000, 8000), RateCounter(1000, 8000)
    assert ours.rate(0) is None
    for counter in (ours, theirs):
        counter.add(1000, 0)
        counter.add(1000, 0)
        counter.add(1000, 600)
    assert ours.rate(999) == theirs.rate(999) == round(8000 * 3000 / 1000)
    assert ours.rate(1499) == theirs.rate(1499) == round(8000 * 1000 / 1000)  # two left
    assert ours.rate(5000) is None and theirs.rate(5000) is None  # all gone
    ours.reset()
    assert ours.rate(6000) is None


async def test_a_sender_port_with_no_nominated_pair_refuses_with_a_connection_error() -> None:
    from aiortc import RTCPeerConnection
    from aiortc.rtcdtlstransport import State

    pc = RTCPeerConnection()
    transceiver = pc.addTransceiver("audio")
    port = aiortc_internals.SenderPort(transceiver.sender)
    dtls = transceiver.sender.transport
    try:
        with pytest.raises(ConnectionError, match="not connected"):
            port.send(RtpPacket(payload_type=111, payload=b"x"))  # DTLS not up yet
        dtls._state = State.CONNECTED  # as when ICE lost its pair after the handshake
        with pytest.raises(ConnectionError, match="Cannot send data"):
            port.send(RtpPacket(payload_type=111, payload=b"x"))
    finally:
        dtls._state = State.NEW
        await pc.close()
