"""A process that uses the bus like a service does, for the cross-process bus tests.

python -m tests.support.bus_worker publish <call_id>
    publishes one call_requested inside a span; prints "<trace_id> <event_id>"
python -m tests.support.bus_worker consume <mode>
    consumes call_requested as consumer "worker"; each handled event is RPUSHed to
    dmcall:<ns>:test:effects in the same transaction as the done mark. Modes:
    record     commit the effect
    slow       mark dmcall:<ns>:test:started, then sleep forever before committing
    die-after  commit the effect, then SIGKILL itself before the ack
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from shared import redis as shared_redis
from shared import telemetry
from shared.bus import Bus, Delivery
from shared.contracts import CallRequested, MediaKind
from shared.redis import KeySpace
from shared.settings import CommonSettings


async def publish(call_id: str) -> None:
    settings = CommonSettings()
    telemetry.setup_tracing("test-publisher", None)
    redis = shared_redis.connect(settings, name="test-publisher")
    bus = Bus(settings, redis, "publisher")
    await bus.start()
    with telemetry.tracer("test").start_as_current_span("place call"):
        trace_id = telemetry.current_trace_id()
        event = CallRequested(call_id=call_id, caller="alice", callee="bob", media=MediaKind.AUDIO)
        await bus.publish(event)
    print(trace_id, event.event_id, flush=True)
    await bus.close()
    await redis.aclose()


async def consume(mode: str) -> None:
    settings = CommonSettings()
    telemetry.setup_tracing("test-consumer", None)
    redis = shared_redis.connect(settings, name="test-consumer")
    keys = KeySpace(settings, "test")
    bus = Bus(settings, redis, "worker")

    async def on_requested(event: CallRequested, delivery: Delivery) -> None:
        if mode == "slow":
            await redis.set(keys("started"), event.call_id)
            await asyncio.sleep(3600)
        async with delivery.transaction() as tx:
            tx.rpush(keys("effects"), f"{event.call_id}:{telemetry.current_trace_id()}")
        if mode == "die-after":
            os.kill(os.getpid(), signal.SIGKILL)

    bus.subscribe("worker", {CallRequested: on_requested})
    await bus.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    command, arg = sys.argv[1], sys.argv[2]
    asyncio.run(publish(arg) if command == "publish" else consume(arg))
