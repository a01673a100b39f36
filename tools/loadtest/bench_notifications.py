"""``make bench-notifications``: how fast call_ringing becomes an SSE message and a webhook.

Starts two notifications processes in a namespace of its own (on the local RabbitMQ and
Redis), opens one SSE stream per user on the second instance, registers one webhook per
user pointing at a local receiver, publishes ``--events`` call_ringing events round-robin
over ``--users`` callees at ``--rate`` per second, and prints latency percentiles (event
``occurred_at`` -> SSE message read / webhook received) and throughput. Figures depend on
the machine; on a shared one they are only indicative. The streams are the harness's
(tools/loadtest/sse.py), and so are the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

from shared import redis as shared_redis
from shared.bus import Bus
from shared.contracts import CallRinging, MediaKind
from shared.settings import DEV_JWT_SECRET
from tools.loadtest.deployment import start_local
from tools.loadtest.http import HttpClient
from tools.loadtest.metrics import latency_line
from tools.loadtest.sse import NotificationFeed
from tools.loadtest.tokens import TokenSource
from tools.stack import free_port


def start_receiver(arrivals: dict[str, float]) -> tuple[ThreadingHTTPServer, int]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            arrivals[json.loads(body)["notification"]["call_id"]] = time.time()
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    Thread(target=server.serve_forever, daemon=True).start()
    return server, port


async def bench(args: argparse.Namespace) -> None:
    deployment = start_local(
        Path(tempfile.mkdtemp(prefix="bench-notifications-")),
        ("notifications", "notifications"),
        env={"NOTIFICATIONS_WEBHOOK_ALLOW_PRIVATE": "true"},
    )
    settings = deployment.settings()
    first, second = deployment.urls("notifications")
    hooks: dict[str, float] = {}
    receiver, port = start_receiver(hooks)
    redis = shared_redis.connect(settings, name="bench")
    bus = Bus(settings, redis, "bench-signaling")
    http = HttpClient(first)
    feed = NotificationFeed(second)
    tokens = TokenSource.from_secret(DEV_JWT_SECRET)
    try:
        await bus.start()
        users = [f"bench{u}" for u in range(args.users)]
        for user in users:
            response = await http.request(
                "POST",
                "/v1/devices",
                token=tokens.user(user),
                json_body={"kind": "webhook", "url": f"http://127.0.0.1:{port}/hook"},
            )
            if response.status >= 300:
                raise RuntimeError(f"registering a webhook: {response.status} {response.body!r}")
        for user in users:
            await feed.subscribe(user, tokens.user(user))
        await asyncio.sleep(0.5)  # the hub subscribes to the users' channels

        sent: dict[tuple[str, str], float] = {}
        interval = 1.0 / args.rate
        started = time.time()
        for n in range(args.events):
            event = CallRinging(
                call_id=uuid.uuid4().hex,
                caller="benchcaller",
                callee=users[n % len(users)],
                media=MediaKind.AUDIO,
                ring_deadline=datetime.now(UTC) + timedelta(minutes=5),
            )
            await bus.publish(event)
            sent[(event.callee, event.call_id)] = event.occurred_at.timestamp()
            await asyncio.sleep(max(0.0, started + (n + 1) * interval - time.time()))
        # The feed stamps arrivals on the monotonic clock; events carry wall-clock times.
        wall = time.time() - time.monotonic()

        def streamed() -> dict[tuple[str, str], float]:
            return {k: wall + min(feed.seen[k].values()) for k in sent if feed.seen.get(k)}

        for _ in range(1200):  # up to a minute for the stragglers
            if len(streamed()) >= len(sent) and len(hooks) >= len(sent):
                break
            await asyncio.sleep(0.05)
        arrived = streamed()
        sse = [(arrived[k] - t) * 1000 for k, t in sent.items() if k in arrived]
        webhook = [(hooks[k[1]] - t) * 1000 for k, t in sent.items() if k[1] in hooks]
        last = max([*arrived.values(), *hooks.values()], default=started)
        print(
            f"notifications: {args.events} call_ringing over {args.users} users at "
            f"{args.rate}/s, 2 instances (consumed by either, streamed from the second)"
        )
        print(latency_line("  event -> SSE message", sse, (50, 90, 99)))
        print(latency_line("  event -> webhook POST", webhook, (50, 90, 99)))
        print(f"  throughput: {len(sse) / max(last - started, 1e-9):.0f} notifications/s")
        if len(sse) < len(sent) or len(webhook) < len(sent):
            print(f"  MISSING: sse {len(sent) - len(sse)}, webhook {len(sent) - len(webhook)}")
    finally:
        await feed.close()
        await http.close()
        await bus.close()
        await redis.aclose()
        receiver.shutdown()
        deployment.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--rate", type=float, default=200.0, help="events per second")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
