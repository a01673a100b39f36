"""The HTTP edge every service is served with: bounded request heads, bounded connections.

uvicorn's httptools protocol buffers a request's head for as long as it grows (a 64 MB
header was read whole, and four of them took a media node from 118 to 430 MB), and
accepts any number of connections. :func:`bounded_protocol` makes the protocol class
``server_config`` hands uvicorn: it counts the bytes and lines of a request head *before*
the parser buffers them, answers 431 (with the JSON error body) past ``max_head_bytes`` or
``max_headers`` and closes the connection, and turns away a connection past
``max_connections`` with 503 before reading it. WebSocket handshakes come through the same
protocol, so the device sockets are bounded too.
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

_REASONS = {431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


def _error_response(status: int, code: str, message: str, retry_after: int | None) -> bytes:
    body = json.dumps({"error": code, "message": message}).encode()
    head = [
        b"HTTP/1.1 %d %s" % (status, _REASONS[status]),
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        b"connection: close",
    ]
    if retry_after is not None:
        head.append(b"retry-after: %d" % retry_after)
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class _BoundedHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes = 16 * 1024
    max_headers = 100
    max_connections = 20_000

    _head_bytes = 0
    _head_lines = 0
    _tail = b""
    _in_head = True

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:
            log.warning("connection refused: %d open, the limit", len(self.connections))
            transport.write(
                _error_response(
                    503, "unavailable", "too many connections to this process", retry_after=1
                )
            )
            transport.close()
            return
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:  # refused in connection_made
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head and not self._head_fits(data):
            self._refuse_head()
            return
        super().data_received(data)

    def _refuse_head(self) -> None:
        log.info(
            "request head refused: over %d bytes or %d header lines",
            self.max_head_bytes,
            self.max_headers,
        )
        self.transport.write(
            _error_response(
                431,
                "headers_too_large",
                f"request line and headers must fit in {self.max_head_bytes} bytes and "
                f"{self.max_headers} header fields",
                retry_after=None,
            )
        )
        self.transport.close()
        self._in_head = False

    def _head_fits(self, data: bytes) -> bool:
        """Counts this chunk's part of the head (up to the blank line that ends it)."""
        window = self._tail + data
        end = window.find(b"\r\n\r\n")
        head = window[len(self._tail) :] if end < 0 else window[len(self._tail) : end + 4]
        self._head_bytes += len(head)
        self._head_lines += head.count(b"\n")
        self._tail = window[-3:]
        # the request line and the final blank line are lines too
        return self._head_bytes <= self.max_head_bytes and self._head_lines <= self.max_headers + 2

    # The same limits counted once more by the parser's callbacks, per request: a request
    # pipelined behind another in one read is not in the chunk count above.
    _parsed_bytes = 0
    _parsed_headers = 0
    _refusing = False

    def on_message_begin(self) -> None:
        self._parsed_bytes, self._parsed_headers = 0, 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count(len(url), 0)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4, 1)
        super().on_header(name, value)

    def _count(self, size: int, headers: int) -> None:
        self._parsed_bytes += size
        self._parsed_headers += headers
        if self._parsed_bytes > self.max_head_bytes or self._parsed_headers > self.max_headers:
            self._refusing = True
            raise _HeadTooLarge  # the parser stops; uvicorn answers via send_400_response

    def send_400_response(self, msg: str) -> None:
        if not self._refusing:
            super().send_400_response(msg)
            return
        self._refuse_head()

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head, self._head_bytes, self._head_lines, self._tail = True, 0, 0, b""
        super().on_message_complete()


class _HeadTooLarge(Exception):
    pass


def bounded_protocol(
    *, max_head_bytes: int, max_headers: int, max_connections: int
) -> type[HttpToolsProtocol]:
    """The httptools protocol with these limits, for ``uvicorn.Config(http=...)``."""
    return type(
        "BoundedHttpToolsProtocol",
        (_BoundedHttpToolsProtocol,),
        {
            "max_head_bytes": max_head_bytes,
            "max_headers": max_headers,
            "max_connections": max_connections,
        },
    )
