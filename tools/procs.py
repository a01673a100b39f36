"""Starting service processes: used by ``make run`` and by the end-to-end tests."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_PORTS = {"signaling": 8001, "policy": 8002, "notifications": 8003, "media": 8004}
PORT_ENV = {
    "signaling": "SIGNALING_PORT",
    "policy": "POLICY_PORT",
    "notifications": "NOTIFICATIONS_PORT",
    "media": "MEDIA_PORT",
}


_PORTS_HANDED_OUT: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port nothing listens on now, for a server started next.

    Taken below the kernel's ephemeral range, where the outgoing connections of every
    process on the machine (to RabbitMQ, Redis, ...) take their local ports, so one of
    those cannot grab it before the server binds; and never the same port twice in one
    process, so two servers started one after the other cannot be handed the same port.
    """
    low, _ = _ephemeral_range()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(max(low - 12_000, 10_000), low)
        if port in _PORTS_HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_HANDED_OUT.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # crowded: any port
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServiceProcess:
    """One ``python -m services.<name>`` process with its own environment."""

    service: str
    port: int
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        env = {**os.environ, **self.env, PORT_ENV[self.service]: str(self.port)}
        env.setdefault("PYTHONUNBUFFERED", "1")
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.service}"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.service} exited with {self.proc.returncode}; see {self.log_path}"
                )
            try:
                response = httpx.get(f"{self.url}/readyz", timeout=1.0)
                if response.status_code == 200:
                    # the answer must come from this process, not another server on the port
                    health = httpx.get(f"{self.url}/healthz", timeout=1.0).json()
                    if health.get("service") == self.service and health.get("pid") in (
                        None,
                        self.proc.pid if self.proc else None,
                    ):
                        return
                    last = f"port {self.port} is answered by another server: {health}"
                else:
                    last = response.text
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise TimeoutError(f"{self.service} not ready after {timeout}s: {last}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
