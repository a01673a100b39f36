"""``make bench-notifications``: how fast call_ringing becomes an SSE message and a webhook.

Starts two notifications processes in a namespace of its own (on the local RabbitMQ and
Redis), opens one SSE stream per user on the second instance, registers one webhook per
user pointing at a local receiver, publishes ``--events`` call_ringing events round-robin
over ``--users`` callees at ``--rate`` per second, and prints latency percentiles (event
``occurred_at`` -> SSE message read / webhook received) and throughput. Figures depend on
the machine; on a shared one they are only indicative.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import httpx
import redis as sync_redis

from shared import redis as shared_redis
from shared.auth import issue_token
from shared.bus import Bus
from shared.contracts import CallRinging, MediaKind
from shared.settings import CommonSettings
from tools import infra
from tools.procs import ServiceProcess, free_port


def percentiles(values: list[float]) -> str:
    if not values:
        return "no samples"
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return (
        f"p50 {pick(0.50):.1f} ms  p90 {pick(0.90):.1f} ms  p99 {pick(0.99):.1f} ms  "
        f"max {ordered[-1]:.1f} ms  mean {statistics.fmean(ordered):.1f} ms  (n={len(ordered)})"
    )


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


async def read_stream(base: str, token: str, seen: dict[str, float], ready: asyncio.Event) -> None:
    async with (
        httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(10.0, read=None)) as client,
        client.stream("GET", "/v1/notifications/stream", params={"token": token}) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("retry:"):
                ready.set()
            elif line.startswith("data: "):
                seen[json.loads(line[6:])["call_id"]] = time.time()


async def bench(args: argparse.Namespace) -> None:
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    env = {
        "DMCALL_ENV": "test",
        "DMCALL_NAMESPACE": namespace,
        "RABBITMQ_URL": os.environ.get("RABBITMQ_URL", infra.DEFAULT_RABBITMQ_URL),
        "REDIS_URL": os.environ.get("REDIS_URL", infra.DEFAULT_REDIS_URL),
        "BUS_QUEUE_EXPIRES_MS": "600000",
        "LOG_LEVEL": "WARNING",
        "NOTIFICATIONS_WEBHOOK_ALLOW_PRIVATE": "true",
    }
    settings = CommonSettings(
        environment="test",
        namespace=namespace,
        rabbitmq_url=env["RABBITMQ_URL"],
        redis_url=env["REDIS_URL"],
    )
    logs = Path(tempfile.mkdtemp(prefix="bench-notifications-"))
    procs = [
        ServiceProcess(
            "notifications",
            free_port(),
            env={**env, "DMCALL_INSTANCE_ID": f"bench-{i}"},
            log_path=logs / f"notifications-{i}.log",
        ).start()
        for i in range(2)
    ]
    hooks: dict[str, float] = {}
    receiver, port = start_receiver(hooks)
    redis = shared_redis.connect(settings, name="bench")
    bus = Bus(settings, redis, "bench-signaling")
    readers: list[asyncio.Task[None]] = []
    try:
        for proc in procs:
            await asyncio.to_thread(proc.wait_ready)
        await bus.start()
        users = [f"bench{u}" for u in range(args.users)]
        tokens = {u: issue_token(settings, u) for u in users}
        async with httpx.AsyncClient(base_url=procs[0].url) as client:
            for user in users:
                response = await client.post(
                    "/v1/devices",
                    json={"kind": "webhook", "url": f"http://127.0.0.1:{port}/hook"},
                    headers={"Authorization": f"Bearer {tokens[user]}"},
                )
                response.raise_for_status()
        streamed: dict[str, float] = {}
        for user in users:
            ready = asyncio.Event()
            readers.append(
                asyncio.create_task(read_stream(procs[1].url, tokens[user], streamed, ready))
            )
            await asyncio.wait_for(ready.wait(), 10)
        await asyncio.sleep(0.5)  # the hub subscribes to the users' channels

        sent: dict[str, float] = {}
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
            sent[event.call_id] = event.occurred_at.timestamp()
            await asyncio.sleep(max(0.0, started + (n + 1) * interval - time.time()))
        for _ in range(1200):  # up to a minute for the stragglers
            if len(streamed) >= len(sent) and len(hooks) >= len(sent):
                break
            await asyncio.sleep(0.05)
        sse = [(streamed[c] - t) * 1000 for c, t in sent.items() if c in streamed]
        webhook = [(hooks[c] - t) * 1000 for c, t in sent.items() if c in hooks]
        last = max([*streamed.values(), *hooks.values()], default=started)
        print(
            f"notifications: {args.events} call_ringing over {args.users} users at "
            f"{args.rate}/s, 2 instances (consumed by either, streamed from the second)"
        )
        print(f"  event -> SSE message    {percentiles(sse)}")
        print(f"  event -> webhook POST   {percentiles(webhook)}")
        print(f"  throughput: {len(sse) / max(last - started, 1e-9):.0f} notifications/s")
        if len(sse) < len(sent) or len(webhook) < len(sent):
            print(f"  MISSING: sse {len(sent) - len(sse)}, webhook {len(sent) - len(webhook)}")
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await bus.close()
        await redis.aclose()
        receiver.shutdown()
        for proc in procs:
            proc.stop()
        keys = sync_redis.Redis.from_url(env["REDIS_URL"])
        batch = list(keys.scan_iter(match=f"dmcall:{namespace}:*", count=1000))
        for i in range(0, len(batch), 500):
            keys.delete(*batch[i : i + 500])
        keys.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--rate", type=float, default=200.0, help="events per second")
    args = parser.parse_args()
    if not infra.ensure(quiet=True):
        raise SystemExit("RabbitMQ and Redis are needed (see make test)")
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
