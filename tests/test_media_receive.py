"""The SFU's receive path (services/media/aiortc_internals.receive_directly): an SRTP
packet is handled in its socket's callback, in order, counted where aiortc counts it,
a packet whose handling fails is dropped and logged now and then, not every time, and
an empty datagram (which aiortc's receive task dies of) is dropped.

Two aiortc peer connections in this process over real UDP sockets; no services.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
import uvloop
from aiortc import RTCPeerConnection
from aiortc.mediastreams import AudioStreamTrack

from services.media import aiortc_internals

PACKETS = 40


def test_now_ms_is_aiortcs_clock() -> None:
    from aiortc import clock

    assert abs(aiortc_internals.now_ms() - clock.current_ms()) <= 2


def test_rtp_is_handled_in_the_socket_callback_in_order_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR):
        uvloop.run(_handled_in_the_callback())  # on uvloop, as the node runs
    # From the middle on every packet's handling raised: each was dropped and the socket
    # went on; the failure was logged once (then every 1000th), not once a packet.
    failures = [r for r in caplog.records if "could not be handled" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]


async def _handled_in_the_callback() -> None:
    aiortc_internals.configure_ice(None, [], 1 << 20)
    publisher, sfu = RTCPeerConnection(), RTCPeerConnection()
    seen: list[tuple[int, bool]] = []  # (sequence number, handled inside a task)
    enough = asyncio.Event()
    arrivals = 0
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def stamp() -> None:
        nonlocal arrivals
        arrivals += 1

    try:
        publisher.addTransceiver(AudioStreamTrack(), direction="sendonly")
        await publisher.setLocalDescription(await publisher.createOffer())
        await sfu.setRemoteDescription(publisher.localDescription)
        (transceiver,) = sfu.getTransceivers()
        receiver = transceiver.receiver

        def before(packet: aiortc_internals.RtpPacket) -> None:
            aiortc_internals.stop_decoder(receiver)
            seen.append((packet.sequence_number, asyncio.current_task() is not None))
            if len(seen) == 10:  # anyone can send the node's sockets an empty datagram
                for protocol in receiver.transport.transport._connection._protocols:
                    stranger.sendto(b"", protocol.transport.get_extra_info("sockname")[:2])
            if len(seen) >= PACKETS:
                enough.set()
            if len(seen) > PACKETS // 2:
                raise RuntimeError("a bug in the handler")  # dropped; the socket goes on

        aiortc_internals.tap_receiver_rtp(receiver, before)
        aiortc_internals.receive_directly(receiver.transport, stamp)
        await sfu.setLocalDescription(await sfu.createAnswer())
        await publisher.setRemoteDescription(sfu.localDescription)
        async with asyncio.timeout(20):
            await enough.wait()
        dtls = receiver.transport
        received = dtls._RTCDtlsTransport__rx_packets  # type: ignore[attr-defined]
    finally:
        stranger.close()
        await publisher.close()
        await sfu.close()

    numbers = [n for n, _ in seen]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), numbers
    in_tasks = [n for n, in_task in seen if in_task]
    # Only packets that came while the DTLS handshake finished (queued behind it) take
    # aiortc's task; every later one is handled in the socket's callback.
    assert len(in_tasks) < 5, in_tasks
    assert not any(in_task for _, in_task in seen[5:])
    assert arrivals == len(seen)  # each was stamped once, on whichever path
    assert received >= len(seen)  # the transport's statistics still count them
