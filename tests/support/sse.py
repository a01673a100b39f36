"""A Server-Sent Events client over real HTTP (httpx streaming), for the stream tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class SseMessage:
    id: str | None = None
    event: str | None = None
    data: str | None = None
    retry: str | None = None
    comment: str | None = None

    def json(self) -> Any:
        assert self.data is not None
        return json.loads(self.data)


class SseStream:
    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.messages: asyncio.Queue[SseMessage] = asyncio.Queue()
        self.started = asyncio.Event()
        """Set once the first message arrived: the server has read where the stream starts."""
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        fields: dict[str, str] = {}
        async for line in self.response.aiter_lines():
            if line == "":
                if fields:
                    await self.messages.put(SseMessage(**fields))
                    self.started.set()
                    fields = {}
            elif line.startswith(":"):
                await self.messages.put(SseMessage(comment=line[1:].strip()))
                self.started.set()
            else:
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value

    async def next(self, timeout: float = 15.0) -> SseMessage:
        return await asyncio.wait_for(self.messages.get(), timeout)

    async def next_data(self, timeout: float = 15.0) -> SseMessage:
        """The next message that carries data (skips comments and the retry advice)."""
        while True:
            message = await self.next(timeout)
            if message.data is not None:
                return message

    async def ended(self) -> None:
        """Returns when the server has ended the stream."""
        await asyncio.shield(self._reader)

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
            await self._reader


@contextlib.asynccontextmanager
async def open_stream(
    base_url: str, *, token: str, last_event_id: str | None = None, via_query: bool = True
) -> AsyncIterator[SseStream]:
    headers = {"Accept": "text/event-stream"}
    params: dict[str, str] = {}
    if via_query:
        params["token"] = token
    else:
        headers["Authorization"] = f"Bearer {token}"
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(10.0, read=None)) as client,
        client.stream("GET", "/v1/notifications/stream", headers=headers, params=params) as resp,
    ):
        assert resp.status_code == 200, (resp.status_code, await resp.aread())
        assert resp.headers["content-type"].startswith("text/event-stream")
        stream = SseStream(resp)
        try:
            # The headers come before the server reads where a new stream starts (its first
            # line, the retry advice, comes after): what is published before that is not in
            # the stream. Waiting for the first line, nothing published from here on is lost.
            await asyncio.wait_for(stream.started.wait(), 10.0)
            yield stream
        finally:
            await stream.close()
