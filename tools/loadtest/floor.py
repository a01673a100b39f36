"""The floor a call's latency is held against, measured in the same run: the broker's
one-way latency and the Redis round trip, on the same machine and the same servers.

Measured through ``shared.bus`` (the services' own broker code, so the hop is the one
they pay) in a namespace of its own that expires by itself:

- ``rabbitmq_one_way_ms``: a transient message to this process's inbox through the
  ``instances`` direct exchange, publish (with confirm) -> consumer callback: the raw hop;
- ``bus_event_hop_ms``: a persistent event on the ``calls`` exchange through a consumer
  with the bus's dedup marks in Redis, publish -> handler: what each service hop costs;
- ``redis_rtt_ms``: ``PING`` round trips on a pooled client.

Samples are sequential (one in flight), so they show latency, not throughput.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from typing import Any

from shared import redis as shared_redis
from shared.bus import Bus, Delivery, Scope
from shared.contracts import CallRequested, MediaKind
from shared.settings import CommonSettings, Environment
from tools.loadtest.metrics import summarize


async def measure_floor(
    rabbitmq_url: str, redis_url: str, *, samples: int = 500
) -> dict[str, dict[str, float | int]]:
    settings = CommonSettings(
        environment=Environment.TEST,
        namespace=f"ltfloor-{uuid.uuid4().hex[:8]}",
        rabbitmq_url=rabbitmq_url,
        redis_url=redis_url,
        bus_queue_expires_ms=60_000,
        bus_dedup_ttl_s=120,
    )
    redis = shared_redis.connect(settings, name="dmcall-loadtest-floor")
    bus = Bus(settings, redis, "loadtest", publish_timeout_s=5.0)
    waiting: dict[str, asyncio.Future[float]] = {}

    async def on_inbox(body: bytes, headers: Mapping[str, Any]) -> None:
        arrived = time.perf_counter()
        future = waiting.pop(body.decode(), None)
        if future is not None and not future.done():
            future.set_result(arrived)

    async def on_event(event: CallRequested, delivery: Delivery) -> None:
        arrived = time.perf_counter()
        future = waiting.pop(event.call_id, None)
        if future is not None and not future.done():
            future.set_result(arrived)

    bus.on_instance_message(on_inbox)
    bus.subscribe("floor", {CallRequested: on_event}, scope=Scope.INSTANCE)
    try:
        await asyncio.wait_for(bus.start(), 20)
        loop = asyncio.get_running_loop()
        one_way: list[float] = []
        hops: list[float] = []
        rtt: list[float] = []
        for i in range(samples + 20):  # the first 20 warm up connections and caches
            key = f"m{i}"
            future: asyncio.Future[float] = loop.create_future()
            waiting[key] = future
            sent = time.perf_counter()
            await bus.send_to_instance("loadtest", settings.instance_id, key.encode())
            arrived = await asyncio.wait_for(future, 5)
            if i >= 20:
                one_way.append((arrived - sent) * 1000)
        for i in range(samples + 20):
            key = f"e{i}"
            future = loop.create_future()
            waiting[key] = future
            event = CallRequested(
                call_id=key, caller="floor-a", callee="floor-b", media=MediaKind.AUDIO
            )
            sent = time.perf_counter()
            await bus.publish(event)
            arrived = await asyncio.wait_for(future, 5)
            if i >= 20:
                hops.append((arrived - sent) * 1000)
        for i in range(samples + 20):
            sent = time.perf_counter()
            await redis.ping()
            if i >= 20:
                rtt.append((time.perf_counter() - sent) * 1000)
        return {
            "rabbitmq_one_way_ms": summarize(one_way),
            "bus_event_hop_ms": summarize(hops),
            "redis_rtt_ms": summarize(rtt),
        }
    finally:
        await bus.close()
        keys = [k async for k in redis.scan_iter(match=f"{settings.redis_prefix}:*", count=1000)]
        for start in range(0, len(keys), 500):
            await redis.delete(*keys[start : start + 500])
        await redis.aclose()
