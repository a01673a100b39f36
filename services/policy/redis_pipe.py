"""A lean, pipelined Redis connection for the permission query's one script.

redis-py's asyncio client spends about 100 µs of CPU per command here (a connection
checked out of the pool and back, a retry wrapper, a timeout, a stream reader), four
times the query's own work. This connection is an asyncio protocol with the hiredis
parser: every command of one event-loop turn goes out in one write, replies come back in
order and are matched to their callers first-in first-out. About 10-25 µs per command.

It does one thing, ``EVALSHA`` with a script loaded on demand, for ``redis://`` URLs; the
store uses redis-py for everything else (and for this too when the URL is another kind).
A lost connection fails the commands in flight with ``ConnectionError`` and the next
command reconnects; a reply that takes longer than the timeout closes the connection
(replies would no longer line up) and fails everything in flight with ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
from typing import Any
from urllib.parse import urlparse

import hiredis
from redis.connection import parse_url

from shared.settings import CommonSettings


class ScriptMissing(Exception):
    """Redis does not know the script (it restarted or was flushed)."""


def supports(url: str) -> bool:
    return urlparse(url).scheme == "redis"


def _command(*args: bytes | str | int) -> bytes:
    """One command in the Redis protocol (RESP): an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            raw = arg
        elif isinstance(arg, str):
            raw = arg.encode()
        else:
            raw = b"%d" % arg
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.outgoing: list[bytes] = []
        self.flush_scheduled = False
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not self.waiting:  # a reply nobody asked for: the stream is out of step
                self.fail(ConnectionError("unexpected reply from Redis"))
                return
            future = self.waiting.popleft()
            if not future.done():
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(exc or ConnectionError("Redis closed the connection"))

    def fail(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(ConnectionError(f"Redis connection lost: {exc}"))

    def send(self, command: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.waiting.append(future)
        self.outgoing.append(command)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            loop.call_soon(self.flush)
        return future

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.outgoing and self.transport is not None and self.lost is None:
            self.transport.write(b"".join(self.outgoing))
        self.outgoing.clear()


class RedisPipe:
    """One pipelined connection that runs one Lua script by its SHA."""

    def __init__(self, settings: CommonSettings, script: str, *, timeout_s: float = 5.0) -> None:
        self._url = settings.redis_url
        self._script = script.encode()
        self._sha = hashlib.sha1(self._script).hexdigest()
        self._timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def _connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            return protocol
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is not None and self._protocol.lost is None:
                return self._protocol
            self._protocol = await self._connect()
            return self._protocol

    async def _connect(self) -> _Protocol:
        options = parse_url(self._url)
        loop = asyncio.get_running_loop()
        _, protocol = await asyncio.wait_for(
            loop.create_connection(
                _Protocol, options.get("host", "127.0.0.1"), options.get("port", 6379)
            ),
            self._timeout_s,
        )
        setup: list[bytes] = []
        if options.get("password"):
            if options.get("username"):
                setup.append(_command("AUTH", options["username"], options["password"]))
            else:
                setup.append(_command("AUTH", options["password"]))
        if options.get("db"):
            setup.append(_command("SELECT", int(options["db"])))
        for command in setup:
            reply = await asyncio.wait_for(protocol.send(command), self._timeout_s)
            if isinstance(reply, hiredis.ReplyError):
                protocol.fail(ConnectionError(str(reply)))
                raise ConnectionError(f"Redis refused the connection set-up: {reply}")
        return protocol

    async def _call(self, command: bytes) -> Any:
        protocol = await self._connection()
        future = protocol.send(command)
        try:
            reply = await asyncio.wait_for(future, self._timeout_s)
        except TimeoutError:
            protocol.fail(TimeoutError("Redis reply timed out"))
            raise
        if isinstance(reply, hiredis.ReplyError):
            if str(reply).startswith("NOSCRIPT"):
                raise ScriptMissing(str(reply))
            raise RuntimeError(f"Redis error: {reply}")
        return reply

    async def evalsha(self, keys: list[str], args: list[str]) -> Any:
        """Run the script; load it first if Redis does not have it. The script only reads,
        so a command lost with its connection is sent once more on a new one."""
        command = _command("EVALSHA", self._sha, len(keys), *keys, *args)
        for attempt in (1, 2):
            try:
                return await self._call(command)
            except ScriptMissing:
                await self._call(_command("SCRIPT", "LOAD", self._script))
                return await self._call(command)
            except ConnectionError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._protocol is not None:
            self._protocol.fail(ConnectionError("closed"))
            self._protocol = None
