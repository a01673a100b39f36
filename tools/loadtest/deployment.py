"""The deployment under load: given URLs, or services the harness (or a benchmark) starts
itself on free ports against the local RabbitMQ and Redis, in a namespace of their own.

:func:`start_local` is the one place the harness and the benchmarks start services (a
tools/stack.py Stack of their own). The
load run gives them the settings it needs (``LOAD_ENV``: a short ring timeout so missed
calls finish within the run, placing-rate limits out of the way); ``--service-env`` adds
or overrides any. Their logs go to the run's output directory; their keys are removed and
their queues expire when the run ends.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.settings import CommonSettings
from tools.loadtest.cprofiled import profile_path
from tools.loadtest.targets import engine_pids
from tools.stack import ServiceProcess, Stack

# Every started service, on top of Stack.isolated's test environment: queues expire once
# the deployment is gone.
BASE_ENV = {"LOG_LEVEL": "WARNING", "BUS_QUEUE_EXPIRES_MS": "120000"}
# What a load run adds. Unknown variables are ignored by the services' settings classes,
# so naming one a service does not (yet) read is harmless.
LOAD_ENV = {
    "BUS_PREFETCH": "256",
    "SIGNALING_CALLS_PER_MINUTE": "100000",
    # The one media node takes every answered call's room: its admission limit (20 rooms
    # by default, sized for a core of real media) is not what a load run measures, and at
    # 50 answered calls/s it turned accepts away (503 no media node).
    "MEDIA_CAPACITY": "10000",
}


def raise_fd_limit() -> int:
    """Many WebSockets need many descriptors: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else 1_048_576
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return int(target)
        except (ValueError, OSError):
            return int(soft)
    return int(soft)


def process_stats(pid: int) -> dict[str, float]:
    """CPU seconds (user+system) and resident memory of one process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = (int(fields[11]) + int(fields[12])) / ticks
        rss_kb = 0
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss_kb = int(line.split()[1])
        return {"cpu_s": cpu, "rss_mb": rss_kb / 1024}
    except (OSError, IndexError, ValueError):
        return {"cpu_s": 0.0, "rss_mb": 0.0}


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass
class Deployment:
    signaling_url: str
    policy_url: str
    notifications_url: str | None
    stack: Stack | None = None
    """The services the harness started (none when it was given URLs)."""

    @property
    def ws_base(self) -> str:
        return "ws" + self.signaling_url.removeprefix("http")

    @property
    def processes(self) -> list[ServiceProcess]:
        return self.stack.processes if self.stack else []

    @property
    def namespace(self) -> str | None:
        return self.stack.namespace if self.stack else None

    @property
    def local(self) -> bool:
        return bool(self.processes)

    def stats(self) -> dict[str, dict[str, float]]:
        """CPU and memory of every started process (``service:port``) and, when the
        services are local, of the local RabbitMQ and Redis servers' processes
        (``rabbitmq:pid``, ``redis:pid``; they serve this run and whatever else shares
        them, so on a shared machine their figure is an upper bound)."""
        stats = {
            f"{p.service}:{p.port}": process_stats(p.proc.pid)
            for p in self.processes
            if p.proc is not None
        }
        for engine, pids in (engine_pids() if self.local else {}).items():
            stats.update({f"{engine}:{pid}": process_stats(pid) for pid in pids})
        return stats

    def urls(self, service: str) -> list[str]:
        return [p.url for p in self.processes if p.service == service]

    def settings(self) -> CommonSettings:
        """Settings for a client of the started services (namespace, broker, Redis)."""
        assert self.stack is not None
        return self.stack.settings()

    def pid(self, service: str) -> int | None:
        for p in self.processes:
            if p.service == service and p.proc is not None:
                return p.proc.pid
        return None

    def stop(self) -> None:
        if self.stack:
            self.stack.stop()


def start_local(
    log_dir: Path,
    services: Sequence[str] = ("policy", "notifications", "signaling", "media"),
    *,
    env: dict[str, str] | None = None,
    rabbitmq_url: str | None = None,
    redis_url: str | None = None,
    cprofile_dir: Path | None = None,
) -> Deployment:
    """Start ``services`` (a name twice: two instances) with ``env`` over ``BASE_ENV``, in a
    stack of their own (tools/stack.py: free ports, a fresh namespace); waits until they
    are ready. With ``cprofile_dir`` each runs under tools/loadtest/cprofiled.py and
    dumps its profile there (``profile_path``) when told to."""
    servers = {"RABBITMQ_URL": rabbitmq_url, "REDIS_URL": redis_url}
    given = {name: url for name, url in servers.items() if url}
    stack = Stack.isolated("lt", log_dir, **{**given, **BASE_ENV, **(env or {})})
    raise_fd_limit()
    if cprofile_dir is not None:
        cprofile_dir.mkdir(parents=True, exist_ok=True)
    try:
        for service in services:
            argv = None
            if cprofile_dir is not None:
                out = profile_path(cprofile_dir, service, len(stack.of(service)) + 1)
                argv = [
                    sys.executable,
                    "-m",
                    "tools.loadtest.cprofiled",
                    f"services.{service}",
                    str(out),
                ]
            stack.start(service, argv=argv)
        stack.wait_ready()
    except BaseException:
        stack.stop()
        raise

    def first(service: str) -> str | None:
        return next((p.url for p in stack.of(service)), None)

    return Deployment(
        first("signaling") or "", first("policy") or "", first("notifications"), stack
    )
