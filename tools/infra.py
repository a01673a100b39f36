"""Where RabbitMQ and Redis are, and whether they answer.

Installing and starting them is ``tools/machine.sh``'s job (the Makefile runs it before
every target); :func:`ensure` runs it when one does not answer, so a tool started by hand
gets the same set-up. ``python -m tools.infra ensure``: exit 0 when both answer.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


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


MACHINE_SCRIPT = Path(__file__).resolve().parent / "machine.sh"


def ensure(*, quiet: bool = False) -> bool:
    """Both answer; when one does not, ``tools/machine.sh`` (the one place that installs and
    starts what a machine needs) is run first, and its advice printed if it cannot."""
    endpoints = (rabbitmq(), redis())
    if not all(e.answers() for e in endpoints):
        subprocess.run(["bash", str(MACHINE_SCRIPT)], check=False)
    ok = True
    for endpoint in endpoints:
        if endpoint.answers():
            if not quiet:
                print(f"{endpoint.name} answers at {endpoint.host}:{endpoint.port}")
            continue
        print(
            f"{endpoint.name} does not answer at {endpoint.url}: start it, or set "
            f"{'RABBITMQ_URL' if endpoint.name == 'RabbitMQ' else 'REDIS_URL'} to one that does",
            file=sys.stderr,
        )
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
