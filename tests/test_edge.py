"""Issue 12, the edge every service shares (shared/edge.py, shared/service.py), against real
service processes: bounded request heads and connections (F4), one JSON answer for a
backing service that is down (F12), 413 for a chunked body over the limit (F14)."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from shared.settings import CommonSettings
from tests.conftest import auth
from tests.support.redis_server import PrivateRedis
from tools.stack import ServiceProcess

pytestmark = pytest.mark.e2e


def _raw(port: int, payload: bytes, *, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        if not read:
            return b""
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def _status_and_body(answer: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


@pytest.mark.parametrize("service", ["signaling", "media"])
def test_f4_a_huge_header_gets_431_and_is_not_read_whole(
    spawn: Callable[..., ServiceProcess], service: str
) -> None:
    proc = spawn(service)
    sent = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        block = b"a" * 65536
        try:
            for _ in range(1024):  # up to 64 MB
                sock.sendall(block)
                sent += len(block)
        except OSError:  # the server closed the connection: it stopped reading
            pass
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
    # it was cut off long before 64 MB reached the process (kernel buffers take a few MB)
    assert sent < 32 * 1024 * 1024
    if answer:  # the answer may be lost to the reset of a connection still being written
        status, body = _status_and_body(answer)
        assert status == 431 and body["error"] == "headers_too_large"


def test_f4_a_head_over_the_limit_gets_a_json_431(spawn: Callable[..., ServiceProcess]) -> None:
    proc = spawn("policy")
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
    status, body = _status_and_body(_raw(proc.port, big))
    assert status == 431
    assert body["error"] == "headers_too_large"
    many = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%d: v\r\n" % i for i in range(150)
    )
    status, body = _status_and_body(_raw(proc.port, many + b"\r\n"))
    assert status == 431


def test_f4_a_big_head_pipelined_behind_a_request_is_refused_too(
    spawn: Callable[..., ServiceProcess],
) -> None:
    proc = spawn("policy")
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    second = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    answer = _raw(proc.port, first + second)
    # Status lines wherever they stand: the first answer's body runs into the second's
    # status line with no line break between them.
    statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]
    assert statuses[-1] == 431, answer[:300]


def test_f4_ordinary_requests_and_keep_alive_still_work(
    spawn: Callable[..., ServiceProcess],
) -> None:
    proc = spawn("notifications")
    with httpx.Client(base_url=proc.url) as http:
        for _ in range(20):  # one connection, twenty requests: the head count resets
            response = http.get("/healthz", headers={"X-Pad": "p" * 4000})
            assert response.status_code == 200
    # a WebSocket handshake goes through the same limits
    status, _ = _status_and_body(
        _raw(
            proc.port,
            b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"X-Big: " + b"a" * 20_000 + b"\r\n\r\n",
        )
    )
    assert status == 431


def test_an_idle_keep_alive_connection_stays_open_for_http_keep_alive_s(
    spawn: Callable[..., ServiceProcess],
) -> None:
    """uvicorn's 5 s would close a connection just as a client (httpx: 5 s) reuses it."""
    assert CommonSettings().http_keep_alive_s == 75  # longer than clients' and LBs' own
    proc = spawn("notifications", HTTP_KEEP_ALIVE_S="3")
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as sock:
        sock.sendall(request)
        assert _one_response(sock).startswith(b"HTTP/1.1 200")
        time.sleep(1.5)  # idle, within the keep-alive: the same connection answers
        sock.sendall(request)
        assert _one_response(sock).startswith(b"HTTP/1.1 200")
        time.sleep(3.8)  # idle past it (and short of uvicorn's own 5 s): closed by the server
        sock.settimeout(0.5)
        closed = sock.recv(65536)  # b"" at once; still open, it would time out
    assert closed == b""


def _one_response(sock: socket.socket) -> bytes:
    """One whole HTTP/1.1 response (head and its Content-Length body) off a kept-alive socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-body: {data!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


def test_f4_connections_past_the_cap_get_503(spawn: Callable[..., ServiceProcess]) -> None:
    proc = spawn("signaling", MAX_CONNECTIONS="4")
    held = [socket.create_connection(("127.0.0.1", proc.port), timeout=10) for _ in range(4)]
    try:
        # the four are open and accepted: the next one is turned away with a JSON 503
        # (it is answered at once, before it sends anything)
        with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as sock:
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        status, body = _status_and_body(answer)
        assert status == 503 and body["error"] == "unavailable"
    finally:
        for sock in held:
            sock.close()
    # once they are closed, the process answers again
    for _ in range(100):
        if httpx.get(f"{proc.url}/healthz").status_code == 200:
            break
    assert httpx.get(f"{proc.url}/healthz").status_code == 200


@pytest.fixture
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def test_f12_signaling_answers_json_503_while_redis_is_down(
    spawn: Callable[..., ServiceProcess], own_redis: PrivateRedis, token: Callable[..., str]
) -> None:
    proc = spawn("signaling", REDIS_URL=own_redis.url)
    own_redis.stop()
    response = httpx.get(f"{proc.url}/v1/calls", headers=auth(token("alice")), timeout=30)
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] == "unavailable"
    assert response.headers["retry-after"] == "1"
    placed = httpx.post(
        f"{proc.url}/v1/calls",
        json={"callee": "bob", "media": "audio", "device_id": "a1"},
        headers=auth(token("alice")),
        timeout=30,
    )
    assert placed.status_code == 503 and placed.json()["error"] == "unavailable"


@pytest.mark.parametrize("service", ["signaling", "policy", "notifications"])
def test_f14_a_chunked_body_over_the_limit_gets_413(
    spawn: Callable[..., ServiceProcess], token: Callable[..., str], service: str
) -> None:
    proc = spawn(service)
    path = {
        "signaling": "/v1/calls",
        "policy": "/v1/settings",
        "notifications": "/v1/devices",
    }[service]
    method = "PUT" if service == "policy" else "POST"

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        yield b'{"pad": "'
        for _ in range(20):
            yield b"x" * 8192
        yield b'"}'

    response = httpx.request(
        method,
        f"{proc.url}{path}",
        content=chunks(),
        headers={**auth(token("alice")), "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413, response.text
    assert response.json()["error"] == "payload_too_large"
