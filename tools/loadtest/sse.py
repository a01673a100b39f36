"""The notifications a sample of users receive on ``GET /v1/notifications/stream`` (SSE).

Each sampled user keeps one stream open for the whole run; every notification is
timestamped on arrival and kept by (user, call_id, kind), so a scenario can wait for what
its call must produce: ``ring_stopped`` once the call stops ringing, ``missed_call`` for a
missed (or busy) call, and the ``incoming_call`` (which notifications leaves out, by
design, when the call had already stopped ringing before it was handled).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import defaultdict
from urllib.parse import urlsplit

from shared.clock import wait_set

Key = tuple[str, str]


class NotificationFeed:
    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self._netloc = parts.netloc
        self._tasks: list[asyncio.Task[None]] = []
        self.seen: dict[Key, dict[str, float]] = defaultdict(dict)
        self._changed: dict[Key, asyncio.Event] = {}
        self.users: set[str] = set()
        self.open_streams = 0
        self.failures: list[str] = []

    async def subscribe(self, user: str, token: str, *, open_within: float = 10.0) -> None:
        """Open the user's stream; returns once the server answered 200 and streams."""
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tasks.append(asyncio.create_task(self._read(user, token, ready)))
        await asyncio.wait_for(ready, open_within)
        self.users.add(user)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _read(self, user: str, token: str, ready: asyncio.Future[None]) -> None:
        try:
            reader, writer = await asyncio.open_connection(self._host, self._port)
        except OSError as exc:
            if not ready.done():
                ready.set_exception(exc)
            return
        try:
            writer.write(
                (
                    f"GET /v1/notifications/stream HTTP/1.1\r\nHost: {self._netloc}\r\n"
                    f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
                ).encode()
            )
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                raise ConnectionError(f"stream for {user}: HTTP {status}")
            chunked = b"chunked" in head.lower()
            if not ready.done():
                ready.set_result(None)
            self.open_streams += 1
            buffer = b""
            while True:
                if chunked:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    if size == 0:
                        break
                    data = await reader.readexactly(size)
                    await reader.readexactly(2)
                else:
                    data = await reader.read(65536)
                    if not data:
                        break
                buffer += data
                while b"\n\n" in buffer:
                    block, buffer = buffer.split(b"\n\n", 1)
                    self._event(user, block)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not ready.done():
                ready.set_exception(exc)
            else:
                self.failures.append(f"{user}: {exc!r}")
        finally:
            writer.close()

    def _event(self, user: str, block: bytes) -> None:
        at = time.monotonic()
        data = b"".join(
            line[5:].strip() for line in block.split(b"\n") if line.startswith(b"data:")
        )
        if not data:
            return
        try:
            item = json.loads(data)
        except ValueError:
            return
        if not isinstance(item, dict) or not isinstance(item.get("call_id"), str):
            return
        key = (user, item["call_id"])
        self.seen[key].setdefault(str(item.get("kind")), at)
        event = self._changed.get(key)
        if event is not None:
            event.set()

    async def wait_for(self, user: str, call_id: str, kinds: set[str], within: float) -> set[str]:
        """Wait until ``kinds`` all arrived for the call; returns those still missing."""
        key = (user, call_id)
        deadline = time.monotonic() + within
        event = self._changed.setdefault(key, asyncio.Event())
        try:
            while True:
                missing = kinds - set(self.seen.get(key, {}))
                remaining = deadline - time.monotonic()
                if not missing or remaining <= 0:
                    return missing
                event.clear()
                await wait_set(event, remaining)
        finally:
            self._changed.pop(key, None)
