"""The one way to start the services on this machine.

``make run``, the load harness, the benchmarks and the end-to-end tests all start their
processes through a :class:`Stack`: one deployment, whose processes share one environment
(on top of this process's), one namespace (``DMCALL_NAMESPACE``: a prefix on exchanges,
queues and Redis keys) and one log directory (``<service>-<n>.log``).

- ``Stack(env, log_dir)``: the namespace and servers are whatever ``env`` (or the
  environment) says; ``Stack.isolated("lt", log_dir, **env)``: a fresh namespace on the
  local RabbitMQ and Redis, in the test environment, its keys removed by ``stop()``.
- ``start(service, **env)``: one ``python -m services.<service>`` process on a free port
  (``fixed_ports=True``: the ports of CONTRACT.md, as ``make run`` serves them);
  ``start_all()``: the four services wired together (signaling told where policy and
  notifications are, as the web client needs), ready.
- ``wait_ready()``: every process answers ``/readyz`` itself; ``stop()``: SIGTERM, then
  SIGKILL; ``of(service)``: its processes; ``settings()``: settings for a client of it.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis as sync_redis
from redis.connection import parse_url
from redis.sentinel import Sentinel as SyncSentinel

from shared.settings import CommonSettings
from tools import infra

ROOT = Path(__file__).resolve().parent.parent

SERVICES = ("policy", "notifications", "media", "signaling")
DEFAULT_PORTS = {"signaling": 8001, "policy": 8002, "notifications": 8003, "media": 8004}
PORT_ENV = {service: f"{service.upper()}_PORT" for service in DEFAULT_PORTS}

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


def remove_keys(
    redis_url: str,
    namespace: str,
    *,
    sentinels: str = "",
    sentinel_master: str = "",
    sentinel_password: str | None = None,
) -> None:
    """Delete every Redis key of ``namespace`` (its queues expire by themselves), on the
    primary: with ``sentinels`` (REDIS_SENTINELS, REDIS_SENTINEL_MASTER and
    REDIS_SENTINEL_PASSWORD as the services read them) the node the Sentinels name now,
    as the services find it; otherwise ``redis_url``'s."""
    client = _sync_primary(redis_url, sentinels, sentinel_master, sentinel_password)
    try:
        batch = list(client.scan_iter(match=f"dmcall:{namespace}:*", count=1000))
        for start in range(0, len(batch), 500):
            client.delete(*batch[start : start + 500])
    finally:
        client.close()


def _sync_primary(
    redis_url: str, sentinels: str, sentinel_master: str, sentinel_password: str | None
) -> sync_redis.Redis:
    if not sentinels:
        return sync_redis.Redis.from_url(redis_url)
    # the services' own parsing of REDIS_SENTINELS (no other setting is read here)
    addresses = CommonSettings.model_construct(redis_sentinels=sentinels).redis_sentinel_addresses
    primary = parse_url(redis_url)  # its user name, password and database are the primary's
    finder = SyncSentinel(
        addresses, sentinel_kwargs={"password": sentinel_password, "socket_timeout": 2.0}
    )
    client: sync_redis.Redis = finder.master_for(
        sentinel_master,
        db=primary.get("db", 0),
        username=primary.get("username"),
        password=primary.get("password"),
        socket_timeout=5.0,
    )
    return client


@dataclass
class ServiceProcess:
    """One ``python -m services.<name>`` process with its own environment."""

    service: str
    port: int
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    argv: list[str] | None = None
    """The command line; default ``python -m services.<service>``."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        env = {**os.environ, **self.env, PORT_ENV[self.service]: str(self.port)}
        env.setdefault("PYTHONUNBUFFERED", "1")
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            self.argv or [sys.executable, "-m", f"services.{self.service}"],
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

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def stop(self, timeout: float = 10.0, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # it did not stop: its asyncio tasks, and where each waits, go to its log first
            # (shared/service.py's SIGUSR1 handler), then it is killed
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@dataclass
class Stack:
    """Service processes of one deployment: one environment, namespace and log directory."""

    env: dict[str, str] = field(default_factory=dict)
    """Every process's environment, on top of this process's."""
    log_dir: Path | None = None
    fixed_ports: bool = False
    """The ports of CONTRACT.md (or ``<SERVICE>_PORT``; media nodes 100 apart), not free ones."""
    owns_namespace: bool = False
    """``stop()`` removes the namespace's Redis keys."""
    processes: list[ServiceProcess] = field(default_factory=list)

    @classmethod
    def isolated(cls, prefix: str, log_dir: Path | None = None, **env: str) -> Stack:
        """A namespace of its own (``<prefix><random>``) on the local RabbitMQ and Redis
        (``RABBITMQ_URL``/``REDIS_URL``, else the defaults; started if need be), in the test
        environment: for the load harness and the benchmarks."""
        if not infra.ensure(quiet=True):
            raise RuntimeError("RabbitMQ and Redis must answer to start the services")
        base = {
            "DMCALL_ENV": "test",
            "DMCALL_NAMESPACE": f"{prefix}{uuid.uuid4().hex[:10]}",
            "RABBITMQ_URL": os.environ.get("RABBITMQ_URL", infra.DEFAULT_RABBITMQ_URL),
            "REDIS_URL": os.environ.get("REDIS_URL", infra.DEFAULT_REDIS_URL),
        }
        return cls({**base, **env}, log_dir, owns_namespace=True)

    @property
    def namespace(self) -> str:
        return self.env.get("DMCALL_NAMESPACE", os.environ.get("DMCALL_NAMESPACE", ""))

    def _setting(self, name: str, default: str) -> str:
        return self.env.get(name, os.environ.get(name, default))

    def settings(self, **overrides: Any) -> CommonSettings:
        """Settings for a client of this stack: its environment, namespace and servers."""
        values: dict[str, Any] = {
            "environment": self._setting("DMCALL_ENV", "production"),
            "namespace": self.namespace,
            "rabbitmq_url": self._setting("RABBITMQ_URL", infra.DEFAULT_RABBITMQ_URL),
            "redis_url": self._setting("REDIS_URL", infra.DEFAULT_REDIS_URL),
            "redis_sentinels": self._setting("REDIS_SENTINELS", ""),
            "redis_sentinel_master": self._setting("REDIS_SENTINEL_MASTER", ""),
        }
        return CommonSettings(**{**values, **overrides})

    def of(self, service: str) -> list[ServiceProcess]:
        return [p for p in self.processes if p.service == service]

    def start(
        self, service: str, *, wait: bool = False, argv: list[str] | None = None, **env: str
    ) -> ServiceProcess:
        """Start one more ``service`` process: the n-th (from 1) logs to ``<service>-<n>.log``
        and, in a namespace (which only this stack uses), is ``DMCALL_INSTANCE_ID``
        ``<service>-<n>``; outside one it keeps the services' unique default."""
        index = len(self.of(service))
        name = f"{service}-{index + 1}"
        if self.namespace:
            env = {"DMCALL_INSTANCE_ID": name, **env}
        if self.fixed_ports:
            port = int(os.environ.get(PORT_ENV[service], DEFAULT_PORTS[service])) + 100 * index
        else:
            port = free_port()
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        proc = ServiceProcess(
            service,
            port,
            env={**self.env, **env},
            log_path=self.log_dir / f"{name}.log" if self.log_dir else None,
            argv=argv,
        )
        self.processes.append(proc.start())
        if wait:
            proc.wait_ready()
        return proc

    def start_all(
        self,
        *,
        media_nodes: int = 1,
        signaling_instances: int = 1,
        media_env: dict[str, str] | None = None,
        **signaling_env: str,
    ) -> Stack:
        """Policy, notifications, ``media_nodes`` media nodes (``media-1``, ``media-2``...)
        and signaling told their URLs (unless the environment names others), all ready."""
        policy = self.start("policy")
        notifications = self.start("notifications")
        for n in range(1, media_nodes + 1):
            media = {"MEDIA_NODE_ID": f"media-{n}", **(media_env or {})}
            self.start("media", wait=False, argv=None, **media)
        urls = {
            "SIGNALING_POLICY_URL": self._setting("SIGNALING_POLICY_URL", policy.url),
            "SIGNALING_NOTIFICATIONS_URL": self._setting(
                "SIGNALING_NOTIFICATIONS_URL", notifications.url
            ),
        }
        for _ in range(signaling_instances):
            self.start("signaling", wait=False, argv=None, **{**urls, **signaling_env})
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        for proc in self.processes:
            proc.wait_ready(timeout)

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        if self.owns_namespace and self.namespace:
            remove_keys(
                self._setting("REDIS_URL", infra.DEFAULT_REDIS_URL),
                self.namespace,
                sentinels=self._setting("REDIS_SENTINELS", ""),
                sentinel_master=self._setting("REDIS_SENTINEL_MASTER", ""),
                sentinel_password=self._setting("REDIS_SENTINEL_PASSWORD", "") or None,
            )
