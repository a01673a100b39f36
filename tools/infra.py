"""Make sure RabbitMQ and Redis answer: start locally installed servers when they are down,
or say exactly what to install.

``python -m tools.infra ensure``: exit 0 when both answer (after starting them if needed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from urllib.parse import urlparse

DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class Endpoint:
    name: str
    url: str

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parsed = urlparse(self.url)
        return parsed.port or (5672 if parsed.scheme.startswith("amqp") else 6379)

    def answers(self, timeout: float = 1.0) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout):
                return True
        except OSError:
            return False


def rabbitmq() -> Endpoint:
    return Endpoint("RabbitMQ", os.environ.get("RABBITMQ_URL", DEFAULT_RABBITMQ_URL))


def redis() -> Endpoint:
    return Endpoint("Redis", os.environ.get("REDIS_URL", DEFAULT_REDIS_URL))


def _wait(endpoint: Endpoint, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if endpoint.answers():
            return True
        time.sleep(0.25)
    return False


def start_rabbitmq(endpoint: Endpoint) -> bool:
    if endpoint.host not in LOCAL_HOSTS or not shutil.which("rabbitmq-server"):
        return False
    print(f"starting RabbitMQ (rabbitmq-server -detached) for {endpoint.host}:{endpoint.port}")
    subprocess.run(["rabbitmq-server", "-detached"], check=False)
    pidfile = f"/var/lib/rabbitmq/mnesia/rabbit@{socket.gethostname()}.pid"
    if shutil.which("rabbitmqctl"):
        subprocess.run(
            ["rabbitmqctl", "wait", "--timeout", "60", pidfile],
            check=False,
            stdout=subprocess.DEVNULL,
        )
    return _wait(endpoint, 60)


def start_redis(endpoint: Endpoint) -> bool:
    if endpoint.host not in LOCAL_HOSTS or not shutil.which("redis-server"):
        return False
    print(f"starting Redis (redis-server --daemonize yes) on {endpoint.host}:{endpoint.port}")
    subprocess.run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "--port",
            str(endpoint.port),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        check=False,
    )
    return _wait(endpoint, 15)


HOW_TO_INSTALL = {
    "RabbitMQ": (
        "RabbitMQ does not answer at {url}.\n"
        "  Debian/Ubuntu: sudo apt-get install rabbitmq-server && sudo rabbitmq-server -detached\n"
        "  macOS:         brew install rabbitmq && brew services start rabbitmq\n"
        "  Docker:        docker run -d -p 5672:5672 rabbitmq:3.13\n"
        "  or set RABBITMQ_URL to a broker that answers."
    ),
    "Redis": (
        "Redis does not answer at {url}.\n"
        "  Debian/Ubuntu: sudo apt-get install redis-server && redis-server --daemonize yes\n"
        "  macOS:         brew install redis && brew services start redis\n"
        "  Docker:        docker run -d -p 6379:6379 redis:7\n"
        "  or set REDIS_URL to a server that answers."
    ),
}


def ensure(*, quiet: bool = False) -> bool:
    ok = True
    for endpoint, starter in ((rabbitmq(), start_rabbitmq), (redis(), start_redis)):
        if endpoint.answers():
            if not quiet:
                print(f"{endpoint.name} answers at {endpoint.host}:{endpoint.port}")
            continue
        if starter(endpoint):
            print(f"{endpoint.name} started at {endpoint.host}:{endpoint.port}")
            continue
        print(HOW_TO_INSTALL[endpoint.name].format(url=endpoint.url), file=sys.stderr)
        ok = False
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["ensure", "check"])
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.command == "check":
        sys.exit(0 if rabbitmq().answers() and redis().answers() else 1)
    sys.exit(0 if ensure(quiet=args.quiet) else 1)


if __name__ == "__main__":
    main()
