"""One call party run on a test host of its own (``python -m tests.support.netns_party``
inside a network namespace, see tests/support/netns.py): an aiortc client sending
pre-encoded VP8 and Opus, driven by JSON lines on stdin, answering JSON lines on stdout.

Commands: ``{"cmd": "connect" | "rejoin", "url": ..., "token": ...}`` answers
``{"status": <HTTP status of the offer>}``; ``{"cmd": "stats"}`` answers the packets
received per kind and when the last one arrived (``time.monotonic()``, which is one clock
for every process of the machine, so the test can compare it with its own);
``{"cmd": "quit"}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import httpx

from tools.media_client import MediaClient, encode_opus, encode_vp8


async def main() -> None:
    client = MediaClient(encode_vp8(160, 120, seconds=2.0, bitrate=150_000), encode_opus(1.0))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def answer(payload: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(payload) + "\n")
        sys.stdout.flush()

    answer({"ready": True})
    # No pooled connections: after a network change the pooled one is dead (its source
    # address is gone) and a request on it would hang until its timeout, as a browser's
    # does not (it drops its sockets on a network change).
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=5, limits=limits) as http:
        while line := await reader.readline():
            command = json.loads(line)
            try:
                if command["cmd"] == "connect":
                    response = await client.connect(command["url"], command["token"], http)
                    answer({"status": response.status_code})
                elif command["cmd"] == "rejoin":
                    response = await client.rejoin(command["url"], command["token"], http)
                    answer({"status": response.status_code})
                elif command["cmd"] == "stats":
                    stats: dict[str, Any] = {
                        kind: {"packets": flow.packets, "last_at": flow.last_at}
                        for kind, flow in client.received.items()
                    }
                    stats["rejoins"] = client.rejoins
                    answer(stats)
                elif command["cmd"] == "quit":
                    break
            except Exception as exc:  # a network that is down: say so, keep going
                answer({"error": f"{type(exc).__name__}: {exc}"})
    await client.close()


if __name__ == "__main__":
    asyncio.run(main())
