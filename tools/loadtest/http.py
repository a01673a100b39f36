"""A lean HTTP/1.1 keep-alive client for the load generator.

Why not httpx: on this 2-core machine the generator shares the CPU with the services it
measures, and httpx spends roughly a millisecond of CPU per request in its own layers.
This client does only what the harness needs (JSON bodies, keep-alive, Content-Length or
chunked responses) on plain asyncio streams with a small pool per base URL, so the
generator's cost stays well under the services'.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

MAX_BODY = 16 * 1024 * 1024


class HttpError(Exception):
    """The request did not produce a response (connection refused, reset, timeout)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def error_code(self) -> str:
        """The contract's ``{"error": code}`` if the body has one, else the status."""
        try:
            data = self.json()
        except ValueError:
            return str(self.status)
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            return str(data["error"])
        return str(self.status)


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class HttpClient:
    """Keep-alive connections to one base URL (``http://host:port``), at most ``size`` open."""

    def __init__(self, base_url: str, *, size: int = 64, timeout: float = 30.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http":
            raise ValueError(f"only http:// URLs are supported by the load client: {base_url}")
        self.base_url = base_url.rstrip("/")
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self._host_header = parts.netloc.encode()
        self._prefix = parts.path.rstrip("/")
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(size)
        self._timeout = timeout

    async def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        body = b"" if json_body is None else json.dumps(json_body).encode()
        lines = [
            f"{method} {self._prefix}{path} HTTP/1.1".encode(),
            b"Host: " + self._host_header,
            b"Content-Length: " + str(len(body)).encode(),
        ]
        if json_body is not None:
            lines.append(b"Content-Type: application/json")
        if token is not None:
            lines.append(b"Authorization: Bearer " + token.encode())
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}".encode())
        payload = b"\r\n".join(lines) + b"\r\n\r\n" + body
        async with self._slots:
            # A pooled connection may have been closed by the server while idle: one retry
            # on a fresh connection is safe because the request was never read.
            for attempt in (0, 1):
                conn = await self._acquire(fresh=attempt == 1)
                try:
                    # a timeout scope, not wait_for: no task per request (a loop turn less)
                    async with asyncio.timeout(self._timeout):
                        response, keep = await self._exchange(conn, payload)
                except TimeoutError as exc:
                    conn.close()
                    raise HttpError("timeout", f"{method} {path}: no answer") from exc
                except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
                    conn.close()
                    if attempt == 0:
                        continue
                    raise HttpError("connection", f"{method} {path}: {exc!r}") from exc
                if keep:
                    self._idle.append(conn)
                else:
                    conn.close()
                return response
        raise AssertionError("unreachable")

    async def _acquire(self, *, fresh: bool) -> _Connection:
        while self._idle and not fresh:
            conn = self._idle.pop()
            if not conn.writer.is_closing() and not conn.reader.at_eof():
                return conn
            conn.close()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port, limit=MAX_BODY), self._timeout
            )
        except (TimeoutError, OSError) as exc:
            raise HttpError("connect", f"{self.base_url}: {exc!r}") from exc
        return _Connection(reader, writer)

    @staticmethod
    async def _exchange(conn: _Connection, payload: bytes) -> tuple[Response, bool]:
        conn.writer.write(payload)
        await conn.writer.drain()
        head = await conn.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head[:-4].split(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length = -1
        chunked = False
        keep = True
        for line in header_lines:
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            if key == b"content-length":
                length = int(value)
            elif key == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif key == b"connection" and value.strip().lower() == b"close":
                keep = False
        if chunked:
            parts: list[bytes] = []
            while True:
                size = int((await conn.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await conn.reader.readuntil(b"\r\n")
                    break
                parts.append(await conn.reader.readexactly(size))
                await conn.reader.readexactly(2)
            body = b"".join(parts)
        elif length >= 0:
            body = await conn.reader.readexactly(length) if length else b""
        else:
            body = await conn.reader.read()
            keep = False
        return Response(status, body), keep
