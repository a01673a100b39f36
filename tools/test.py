"""``make test``: find (or start) RabbitMQ and Redis, then run pytest.

Order: ``RABBITMQ_URL``/``REDIS_URL`` when set; else the local servers on their default
ports (started if installed but down); else the test fixtures use testcontainers where a
Docker engine answers; else it stops with what to install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tools import infra


def _docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    result = subprocess.run(
        ["docker", "info"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False
    )
    return result.returncode == 0


def main() -> None:
    explicit = "RABBITMQ_URL" in os.environ or "REDIS_URL" in os.environ
    if explicit or infra.ensure(quiet=True):
        os.environ.setdefault("RABBITMQ_URL", infra.DEFAULT_RABBITMQ_URL)
        os.environ.setdefault("REDIS_URL", infra.DEFAULT_REDIS_URL)
    elif _docker_answers():
        print("no local RabbitMQ/Redis: the tests will start them with testcontainers")
    else:
        print("RabbitMQ and Redis are needed for the tests (see above).", file=sys.stderr)
        sys.exit(2)
    args = [sys.executable, "-m", "pytest", *sys.argv[1:]]
    os.execv(sys.executable, args)


if __name__ == "__main__":
    main()
