"""A real HTTP server on 127.0.0.1 that plays a webhook receiver, for the push tests.

Each path answers as scripted: ``receiver.script("/flaky", 500, 500, 200)`` answers the first
request 500, the second 500, then 200 for ever (the last status repeats). ``HANG`` never
answers (the request is held until the receiver stops). Every request is recorded.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tools.stack import free_port

HANG = -1


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.time)
    """When it arrived (unix seconds)."""


class WebhookReceiver:
    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[Received] = []
        self._scripts: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def script(self, path: str, *statuses: int) -> None:
        with self._lock:
            self._scripts[path] = list(statuses)

    def received(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def _next_status(self, path: str, request: Received) -> int:
        with self._lock:
            self.requests.append(request)
            script = self._scripts.get(path, [200])
            return script.pop(0) if len(script) > 1 else script[0]

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                request = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                status = receiver._next_status(self.path, request)
                if status == HANG:
                    receiver._release.wait(60)
                    return
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler
