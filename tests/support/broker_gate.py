"""A TCP gate in front of the real broker, for one test's service process: open, it
forwards every byte both ways; shut, it drops the connections it carries and accepts new
ones that it never answers (a broker that hangs, the worst outage for a client), until it
is opened again. The shared broker itself is never touched.

It runs on its own thread and event loop: the ``spawn`` fixture waits for a service's
readiness synchronously, and the gate must keep forwarding meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

CHUNK = 64 * 1024
T = TypeVar("T")


class BrokerGate:
    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self._upstream_url = parts
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 5672
        self._open = True
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        """The broker URL a service should use: the upstream's, at the gate's port."""
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        netloc = self._upstream_url.netloc.rsplit("@", 1)
        auth = f"{netloc[0]}@" if len(netloc) == 2 else ""
        return urlunsplit(self._upstream_url._replace(netloc=f"{auth}127.0.0.1:{port}"))

    def start(self) -> BrokerGate:
        self._thread.start()
        self._server = self._run(asyncio.start_server(self._accept, "127.0.0.1", 0))
        return self

    def shut(self) -> None:
        """Drop every connection; hold new ones without a word."""
        self._loop.call_soon_threadsafe(self._set, False)

    def open(self) -> None:
        """Forward again; the connections held while shut are dropped (clients retry)."""
        self._loop.call_soon_threadsafe(self._set, True)

    def stop(self) -> None:
        self._run(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def _set(self, open_: bool) -> None:
        self._open = open_
        self._drop_all()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._drop_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _drop_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            if not self._open:
                while await reader.read(CHUNK):  # swallow the handshake, answer nothing
                    pass
                return
            up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
            self._writers.add(up_writer)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()
            self._writers.discard(writer)
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.transport.abort()
