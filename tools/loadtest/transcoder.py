"""The transcoding path, for comparison in ``make bench-media``: aiortc's usual relay.

Each party's tracks are decoded by aiortc's receivers, handed to the other party through
``MediaRelay`` and encoded again by its senders: what an aiortc "SFU" does without the
packet forwarding of services/media. Same HTTP shape as the media service
(``POST /v1/rooms/{call_id}/sessions`` with an SDP offer), no auth: a benchmark only.

``python -m tools.loadtest.transcoder PORT``. ``GET /delays`` gives the video frame
delay inside it (a frame's last packet in -> the re-encoded frame out) in milliseconds.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import uvicorn
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.contrib.media import MediaRelay
from fastapi import FastAPI, Request, Response

from services.media.delays import DelayRecorder


class PeerTrack(MediaStreamTrack):
    """What one party receives: the other party's decoded track, once it is there."""

    def __init__(self, kind: str, source: asyncio.Future[Any], relay: MediaRelay) -> None:
        super().__init__()
        self.kind = kind
        self._source = source
        self._relay = relay
        self._proxy: MediaStreamTrack | None = None

    async def recv(self) -> Any:
        if self._proxy is None:
            track, _ = await self._source
            self._proxy = self._relay.subscribe(track)
        return await self._proxy.recv()


def create_app() -> FastAPI:
    app = FastAPI()
    relay = MediaRelay()
    rooms: dict[str, list[dict[str, asyncio.Future[Any]]]] = {}
    joined: dict[str, int] = {}
    pcs: set[RTCPeerConnection] = set()
    delays = DelayRecorder()
    arrivals: dict[int, dict[int, float]] = {}  # receiver id -> raw rtp ts -> arrival

    def tap_receiver(receiver: RTCRtpReceiver) -> None:
        original = receiver._handle_rtp_packet
        seen = arrivals.setdefault(id(receiver), {})

        async def handle(packet: Any, arrival_time_ms: int) -> None:
            if packet.marker:
                seen[packet.timestamp] = time.perf_counter()
                if len(seen) > 300:
                    seen.pop(next(iter(seen)))
            await original(packet, arrival_time_ms)

        receiver._handle_rtp_packet = handle  # type: ignore[method-assign]

    def tap_sender(sender: RTCRtpSender, source: asyncio.Future[Any]) -> None:
        original = sender._next_encoded_frame

        async def next_frame(codec: Any) -> Any:
            frame = await original(codec)
            if frame is not None and source.done():
                receiver: RTCRtpReceiver = source.result()[1]
                mapper = receiver._RTCRtpReceiver__timestamp_mapper  # type: ignore[attr-defined]
                if mapper._origin is not None:
                    raw = (frame.timestamp + mapper._origin) & 0xFFFFFFFF
                    arrived = arrivals.get(id(receiver), {}).pop(raw, None)
                    if arrived is not None:
                        delays.record(time.perf_counter() - arrived)
            return frame

        sender._next_encoded_frame = next_frame  # type: ignore[method-assign]

    @app.post("/v1/rooms/{call_id}/sessions", status_code=201)
    async def join(call_id: str, request: Request) -> Response:
        loop = asyncio.get_running_loop()
        if call_id not in rooms:
            # Two parties; each one's (track, receiver) per kind, once its media arrives.
            rooms[call_id] = [{k: loop.create_future() for k in ("audio", "video")} for _ in "ab"]
            joined[call_id] = 0
        index = joined[call_id]
        joined[call_id] += 1
        mine, theirs = rooms[call_id][index], rooms[call_id][1 - index]
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pcs.add(pc)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            for transceiver in pc.getTransceivers():
                if transceiver.receiver.track is track and not mine[track.kind].done():
                    mine[track.kind].set_result((track, transceiver.receiver))

        await pc.setRemoteDescription(
            RTCSessionDescription(sdp=(await request.body()).decode(), type="offer")
        )
        for transceiver in pc.getTransceivers():
            sender = pc.addTrack(PeerTrack(transceiver.kind, theirs[transceiver.kind], relay))
            if transceiver.kind == "video":
                tap_receiver(transceiver.receiver)
                tap_sender(sender, theirs["video"])
        await pc.setLocalDescription(await pc.createAnswer())
        return Response(
            pc.localDescription.sdp,
            status_code=201,
            media_type="application/sdp",
            headers={"Location": f"/v1/rooms/{call_id}/sessions/{index}"},
        )

    @app.get("/delays")
    async def get_delays() -> dict[str, Any]:
        p50, p99 = delays.percentiles(0.5, 0.99)
        return {
            "p50_ms": None if p50 is None else p50 * 1000,
            "p99_ms": None if p99 is None else p99 * 1000,
            "count": delays.count,
        }

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.on_event("shutdown")
    async def close() -> None:
        await asyncio.gather(*(pc.close() for pc in pcs), return_exceptions=True)

    return app


def main() -> None:
    port = int(sys.argv[1])
    uvicorn.run(create_app(), host="127.0.0.1", port=port, loop="uvloop", log_level="warning")


if __name__ == "__main__":
    main()
