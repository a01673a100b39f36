"""``make run``: RabbitMQ and Redis up, the four services started, demo users seeded.

Ctrl-C (or SIGTERM) stops every service. Ports follow CONTRACT.md; ``MEDIA_NODES``
(default 1) media processes run on 8004, 8104, 8204, ...
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time
from pathlib import Path

from tools import infra
from tools.procs import DEFAULT_PORTS, ROOT, ServiceProcess

LOG_DIR = ROOT / ".run"


def _services() -> list[ServiceProcess]:
    LOG_DIR.mkdir(exist_ok=True)
    procs: list[ServiceProcess] = []
    for name in ("policy", "signaling", "notifications"):
        port = int(os.environ.get(f"{name.upper()}_PORT", DEFAULT_PORTS[name]))
        procs.append(ServiceProcess(name, port, log_path=LOG_DIR / f"{name}.log"))
    # The web client (served by signaling) calls policy and notifications from the browser.
    signaling, urls = procs[1], {p.service: p.url for p in procs}
    for name in ("policy", "notifications"):
        variable = f"SIGNALING_{name.upper()}_URL"
        signaling.env[variable] = os.environ.get(variable, urls[name])
    nodes = int(os.environ.get("MEDIA_NODES", "1"))
    base = int(os.environ.get("MEDIA_PORT", DEFAULT_PORTS["media"]))
    for index in range(nodes):
        port = base + 100 * index
        procs.append(
            ServiceProcess(
                "media",
                port,
                env={"MEDIA_NODE_ID": f"media-{index + 1}"},
                log_path=LOG_DIR / f"media-{index + 1}.log",
            )
        )
    return procs


def _seed(procs: list[ServiceProcess]) -> None:
    if importlib.util.find_spec("tools.seed") is None:
        return
    from tools import seed

    urls = {p.service: p.url for p in procs}
    seed.seed(policy_url=urls["policy"])


def main() -> None:
    if not infra.ensure():
        sys.exit(1)
    os.environ.setdefault("RABBITMQ_URL", infra.DEFAULT_RABBITMQ_URL)
    os.environ.setdefault("REDIS_URL", infra.DEFAULT_REDIS_URL)
    # The services default to production; this is a machine to try them on (dev tokens,
    # the development secrets, the demo users).
    os.environ.setdefault("DMCALL_ENV", "development")
    procs = _services()
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.wait_ready(timeout=60)
        _seed(procs)
        print("\ndmcall is up (logs in .run/):")
        for proc in procs:
            print(f"  {proc.service:<14} {proc.url}   (/readyz 200)")
        print(f"\n  web client     {procs[1].url}/")
        print("  token          make token USER=alice\n\nCtrl-C stops everything.")
        while not stopping:
            for proc in procs:
                if proc.proc is not None and proc.proc.poll() is not None:
                    print(f"{proc.service} on {proc.port} exited; see {proc.log_path}")
                    stopping = True
            time.sleep(0.5)
    finally:
        print("stopping...")
        for proc in procs:
            proc.stop()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
