"""``make run``: RabbitMQ and Redis up, the four services started, demo users seeded.

Ctrl-C (or SIGTERM) stops every service. Ports follow CONTRACT.md (or ``<SERVICE>_PORT``);
``MEDIA_NODES`` (default 1) media processes run on 8004, 8104, 8204, ...; logs in ``.run/``.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from tools import infra, seed
from tools.stack import ROOT, Stack

LOG_DIR = ROOT / ".run"


def main() -> None:
    if not infra.ensure():
        sys.exit(1)
    os.environ.setdefault("RABBITMQ_URL", infra.DEFAULT_RABBITMQ_URL)
    os.environ.setdefault("REDIS_URL", infra.DEFAULT_REDIS_URL)
    # The services default to production; this is a machine to try them on (dev tokens,
    # the development secrets, the demo users).
    os.environ.setdefault("DMCALL_ENV", "development")
    stack = Stack(log_dir=LOG_DIR, fixed_ports=True)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        stack.start_all(media_nodes=int(os.environ.get("MEDIA_NODES", "1")))
        seed.seed(policy_url=stack.of("policy")[0].url)
        print("\ndmcall is up (logs in .run/):")
        for proc in stack.processes:
            print(f"  {proc.service:<14} {proc.url}   (/readyz 200)")
        print(f"\n  web client     {stack.of('signaling')[0].url}/")
        print("  token          make token USER=alice\n\nCtrl-C stops everything.")
        while not stopping:
            for proc in stack.processes:
                if proc.exited():
                    print(f"{proc.service} on {proc.port} exited; see {proc.log_path}")
                    stopping = True
            time.sleep(0.5)
    finally:
        print("stopping...")
        stack.stop()


if __name__ == "__main__":
    main()
