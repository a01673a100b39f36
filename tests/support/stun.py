"""A STUN server (RFC 5389 Binding only) on a loopback UDP port, in a thread: it answers
every Binding request with the sender's address and remembers who asked."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field

from aioice import stun


@dataclass
class StunServer:
    sock: socket.socket = field(
        default_factory=lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    )
    askers: list[tuple[str, int]] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()
        return f"stun:{host}:{port}"

    def start(self) -> StunServer:
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._serve, name="stun-server", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                data, addr = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            try:
                request = stun.parse_message(data)
            except ValueError:
                continue
            if (request.message_method, request.message_class) != (
                stun.Method.BINDING,
                stun.Class.REQUEST,
            ):
                continue
            self.askers.append(addr)
            response = stun.Message(
                stun.Method.BINDING,
                stun.Class.RESPONSE,
                transaction_id=request.transaction_id,
                attributes={"XOR-MAPPED-ADDRESS": addr},
            )
            self.sock.sendto(bytes(response), addr)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        self.sock.close()
