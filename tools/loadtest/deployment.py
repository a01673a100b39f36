"""The deployment under load: given URLs, or services the harness (or a benchmark) starts
itself on free ports against the local RabbitMQ and Redis, in a namespace of their own.

:func:`start_local` is the one place the harness and the benchmarks start services. The
load run gives them the settings it needs (``LOAD_ENV``: a short ring timeout so missed
calls finish within the run, placing-rate limits out of the way); ``--service-env`` adds
or overrides any. Their logs go to the run's output directory; their keys are removed and
their queues expire when the run ends.
"""

from __future__ import annotations

import os
import resource
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis as sync_redis

from shared.settings import CommonSettings, Environment
from tools import infra
from tools.procs import ServiceProcess, free_port

# Every started service: a test deployment whose queues expire once it is gone.
BASE_ENV = {"DMCALL_ENV": "test", "LOG_LEVEL": "WARNING", "BUS_QUEUE_EXPIRES_MS": "120000"}
# What a load run adds. Unknown variables are ignored by the services' settings classes,
# so naming one a service does not (yet) read is harmless.
LOAD_ENV = {
    "BUS_PREFETCH": "256",
    "SIGNALING_CALLS_PER_MINUTE": "100000",
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
    namespace: str | None = None
    processes: list[ServiceProcess] = field(default_factory=list)
    redis_url: str = infra.DEFAULT_REDIS_URL
    rabbitmq_url: str = infra.DEFAULT_RABBITMQ_URL

    @property
    def ws_base(self) -> str:
        return "ws" + self.signaling_url.removeprefix("http")

    @property
    def local(self) -> bool:
        return bool(self.processes)

    def stats(self) -> dict[str, dict[str, float]]:
        return {
            f"{p.service}:{p.port}": process_stats(p.proc.pid)
            for p in self.processes
            if p.proc is not None
        }

    def urls(self, service: str) -> list[str]:
        return [p.url for p in self.processes if p.service == service]

    def settings(self) -> CommonSettings:
        """The started services' shared settings (namespace, broker, Redis, dev secret)."""
        return CommonSettings(
            environment=Environment.TEST,
            namespace=self.namespace or "",
            rabbitmq_url=self.rabbitmq_url,
            redis_url=self.redis_url,
        )

    def pid(self, service: str) -> int | None:
        for p in self.processes:
            if p.service == service and p.proc is not None:
                return p.proc.pid
        return None

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        if self.namespace:
            client = sync_redis.Redis.from_url(self.redis_url)
            try:
                batch = list(client.scan_iter(match=f"dmcall:{self.namespace}:*", count=1000))
                for start in range(0, len(batch), 500):
                    client.delete(*batch[start : start + 500])
            finally:
                client.close()


def start_local(
    log_dir: Path,
    services: Sequence[str] = ("policy", "notifications", "signaling", "media"),
    *,
    env: dict[str, str] | None = None,
    rabbitmq_url: str | None = None,
    redis_url: str | None = None,
) -> Deployment:
    """Start ``services`` (a name twice: two instances) on free ports in a fresh namespace,
    with ``env`` over ``BASE_ENV``; waits until they are ready."""
    if not infra.ensure(quiet=True):
        raise RuntimeError("RabbitMQ and Redis must answer to start the services locally")
    raise_fd_limit()
    namespace = f"lt{uuid.uuid4().hex[:10]}"
    base = {
        "RABBITMQ_URL": rabbitmq_url or os.environ.get("RABBITMQ_URL", infra.DEFAULT_RABBITMQ_URL),
        "REDIS_URL": redis_url or os.environ.get("REDIS_URL", infra.DEFAULT_REDIS_URL),
        **BASE_ENV,
        "DMCALL_NAMESPACE": namespace,
    }
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[ServiceProcess] = []
    for service in services:
        index = sum(1 for p in procs if p.service == service)
        port = free_port()
        extra = {"DMCALL_INSTANCE_ID": f"{namespace}-{service}-{index}"}
        if service == "media":
            extra["MEDIA_NODE_ID"] = f"{namespace}-media-{index}"
            extra["MEDIA_PUBLIC_URL"] = f"http://127.0.0.1:{port}"
        procs.append(
            ServiceProcess(
                service,
                port,
                env={**base, **extra, **(env or {})},
                log_path=log_dir / f"{service}-{index}.log",
            )
        )

    def first(service: str) -> str | None:
        return next((p.url for p in procs if p.service == service), None)

    deployment = Deployment(
        signaling_url=first("signaling") or "",
        policy_url=first("policy") or "",
        notifications_url=first("notifications"),
        namespace=namespace,
        processes=procs,
        redis_url=base["REDIS_URL"],
        rabbitmq_url=base["RABBITMQ_URL"],
    )
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.wait_ready(timeout=60)
    except BaseException:
        deployment.stop()
        raise
    return deployment
