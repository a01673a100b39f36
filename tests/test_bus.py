"""The bus against the real RabbitMQ and Redis: delivery across processes, exactly-once
effects through SIGKILL, dead-lettering, reconnection, trace propagation."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from redis.asyncio import Redis

from shared.bus import ATTEMPT_HEADER, ERROR_HEADER, Delivery
from shared.contracts import CallDeclined, CallRequested, MediaKind
from shared.settings import CommonSettings
from tests.conftest import Infra
from tests.support.waiting import eventually
from tools.stack import ROOT

pytestmark = pytest.mark.e2e


def requested(call_id: str) -> CallRequested:
    return CallRequested(call_id=call_id, caller="alice", callee="bob", media=MediaKind.AUDIO)


class Worker:
    """A tests.support.bus_worker process."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.bus_worker", *args],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=open(log, "ab"),
            text=True,
        )

    def wait_line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line, f"worker printed nothing; see {self.log}:\n{self.log.read_text()[-3000:]}"
        return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


Workers = Callable[..., Worker]
BusFactory = Callable[..., Any]


@pytest.fixture
def workers(service_env: dict[str, str], tmp_path: Path) -> Iterator[Workers]:
    started: list[Worker] = []

    def start(*args: str, **env: str) -> Worker:
        worker = Worker({**service_env, **env}, tmp_path / f"worker-{len(started)}.log", *args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


class Effects:
    """What the bus_worker's handlers leave in Redis: the ``dmcall:<ns>:test:effects`` list,
    and ``dmcall:<ns>:test:started`` (set by ``slow``)."""

    def __init__(self, redis: Redis, namespace: str) -> None:
        self.redis, self.prefix = redis, f"dmcall:{namespace}:test"

    async def recorded(self) -> list[bytes]:
        return list(await self.redis.lrange(f"{self.prefix}:effects", 0, -1))

    async def started(self) -> bool:
        return bool(await self.redis.get(f"{self.prefix}:started"))


@pytest.fixture
def effects(redis_client: Redis, namespace: str) -> Effects:
    return Effects(redis_client, namespace)


def call_ids() -> tuple[list[str], Callable[[CallRequested, Delivery], Awaitable[None]]]:
    """A handler that notes the call id of each event it is given, and its notes."""
    seen: list[str] = []

    async def on_requested(event: CallRequested, delivery: Delivery) -> None:
        seen.append(event.call_id)

    return seen, on_requested


async def test_event_published_by_one_process_is_handled_by_another_in_the_same_trace(
    workers: Workers, effects: Effects
) -> None:
    consumer = workers("consume", "record")
    assert consumer.wait_line() == "ready"
    publisher = workers("publish", "call-x")
    trace_id, _event_id = publisher.wait_line().split()
    assert await eventually(effects.recorded) == [f"call-x:{trace_id}".encode()]


async def test_sigkill_mid_handler_redelivers_and_the_effect_happens_once(
    workers: Workers, bus_factory: BusFactory, effects: Effects
) -> None:
    slow = workers("consume", "slow", BUS_CLAIM_TTL_MS="1500")
    assert slow.wait_line() == "ready"
    publisher = await bus_factory("publisher")
    await publisher.publish(requested("call-k"))
    await eventually(effects.started)
    slow.kill()  # SIGKILL in the middle of the handler: nothing committed, nothing acked

    survivor = workers("consume", "record", BUS_CLAIM_TTL_MS="1500")
    assert survivor.wait_line() == "ready"
    recorded = await eventually(effects.recorded)
    assert [e.split(b":")[0] for e in recorded] == [b"call-k"]
    await asyncio.sleep(2.0)  # nothing more arrives later
    assert len(await effects.recorded()) == 1


async def test_sigkill_after_commit_before_ack_does_not_repeat_the_effect(
    workers: Workers, bus_factory: BusFactory, effects: Effects, namespace: str, infra: Infra
) -> None:
    dying = workers("consume", "die-after")
    assert dying.wait_line() == "ready"
    publisher = await bus_factory("publisher")
    await publisher.publish(requested("call-d"))
    await asyncio.to_thread(dying.proc.wait, 15)
    assert len(await effects.recorded()) == 1

    survivor = workers("consume", "record")
    assert survivor.wait_line() == "ready"
    queue = f"{namespace}.worker.worker"

    def drained() -> bool:
        out = infra.rabbitmqctl("list_queues", "name", "messages")
        return any(line.split() == [queue, "0"] for line in out.splitlines())

    await eventually(drained)  # the redelivered message was acked as a duplicate
    assert len(await effects.recorded()) == 1


async def _dlq_messages(infra: Infra, queue: str, expected: int) -> list[aio_pika.IncomingMessage]:
    connection = await aio_pika.connect(infra.rabbitmq_url)
    try:
        channel = await connection.channel()
        dlq = await channel.declare_queue(queue, passive=True)
        got: list[Any] = []

        async def fetch() -> bool:
            message = await dlq.get(fail=False, no_ack=True)
            if message is not None:
                got.append(message)
            return len(got) >= expected

        await eventually(fetch)
        assert await dlq.get(fail=False) is None
        return got
    finally:
        await connection.close()


async def test_a_handler_that_always_raises_ends_in_the_dead_letter_queue(
    bus_factory: BusFactory, make_settings: Callable[..., CommonSettings], infra: Infra
) -> None:
    settings = make_settings(bus_max_attempts=3, bus_retry_delay_ms=50)
    calls: list[str] = []

    async def on_requested(event: CallRequested, delivery: Delivery) -> None:
        calls.append(event.call_id)
        if event.call_id == "poison":
            raise ValueError(f"cannot handle {event.call_id} (attempt {delivery.attempt})")

    await bus_factory("svc", settings, flaky={CallRequested: on_requested})
    publisher = await bus_factory("publisher", settings)
    await publisher.publish(requested("poison"))
    await publisher.publish(requested("fine-1"))
    parked = await _dlq_messages(infra, f"{settings.namespace}.svc.flaky.dlq", 1)
    assert json.loads(parked[0].body)["call_id"] == "poison"
    assert parked[0].headers[ATTEMPT_HEADER] == 3
    assert "ValueError: cannot handle poison (attempt 3)" in str(parked[0].headers[ERROR_HEADER])
    assert calls.count("poison") == 3
    # The queue keeps flowing after the poison message.
    await publisher.publish(requested("fine-2"))
    await eventually(lambda: "fine-2" in calls)
    assert calls.count("fine-1") == 1


async def test_an_undecodable_message_is_parked_at_once(
    bus_factory: BusFactory, settings: CommonSettings, infra: Infra
) -> None:
    seen, on_requested = call_ids()
    await bus_factory("svc", strict={CallRequested: on_requested})
    connection = await aio_pika.connect(infra.rabbitmq_url)
    channel = await connection.channel()
    exchange = await channel.get_exchange(f"{settings.namespace}.calls")
    await exchange.publish(aio_pika.Message(b'{"type": "call_requested"'), "call_requested")
    bad_fields = {"type": "call_requested", "call_id": "c", "caller": 1}
    await exchange.publish(aio_pika.Message(json.dumps(bad_fields).encode()), "call_requested")
    await connection.close()
    parked = await _dlq_messages(infra, f"{settings.namespace}.svc.strict.dlq", 2)
    errors = sorted(str(m.headers[ERROR_HEADER]) for m in parked)
    assert errors[0].startswith("undecodable: event is not JSON")
    assert errors[1].startswith("undecodable: invalid call_requested") and "callee" in errors[1]
    assert seen == []


async def test_the_same_event_delivered_twice_is_handled_once(bus_factory: BusFactory) -> None:
    seen: list[str] = []

    async def on_declined(event: CallDeclined, delivery: Delivery) -> None:
        seen.append(str(event.event_id))

    await bus_factory("svc", dedup={CallDeclined: on_declined})
    await bus_factory("svc", dedup={CallDeclined: on_declined})  # a second instance
    publisher = await bus_factory("publisher")
    event = CallDeclined(call_id="c1", caller="alice", callee="bob")
    for _ in range(3):
        await publisher.publish(event)
    marker = CallDeclined(call_id="c2", caller="alice", callee="bob")
    await publisher.publish(marker)
    await eventually(lambda: str(marker.event_id) in seen)
    await asyncio.sleep(0.3)
    assert seen.count(str(event.event_id)) == 1


def _connection_names(infra: Infra, needle: str) -> list[str]:
    out = infra.rabbitmqctl("list_connections", "pid", "client_properties")
    return [line.split("\t")[0] for line in out.splitlines() if needle in line]


async def test_publishing_and_consuming_resume_after_the_connection_drops(
    bus_factory: BusFactory, settings: CommonSettings, infra: Infra
) -> None:
    seen, on_requested = call_ids()
    bus = await bus_factory("svc", flow={CallRequested: on_requested})
    await bus.publish(requested("before"))
    await eventually(lambda: "before" in seen)

    names = _connection_names(infra, f"{settings.namespace}.svc")
    assert len(names) == 1, names
    infra.rabbitmqctl("close_connection", names[0], "test: dropping the connection")
    await eventually(lambda: not bus.ready, timeout=10, step=0.01)

    await bus.publish(requested("after"))  # waits for the reconnect
    await eventually(lambda: "after" in seen, timeout=30)
    assert bus.ready
    assert len(_connection_names(infra, f"{settings.namespace}.svc")) == 1


async def test_consuming_carries_on_after_redis_restarts(
    bus_factory: BusFactory, make_settings: Callable[..., CommonSettings], private_redis: Any
) -> None:
    settings = make_settings(redis_url=private_redis.url)
    seen, on_requested = call_ids()
    bus = await bus_factory("svc", settings, flow={CallRequested: on_requested})
    await bus.publish(requested("before"))
    await eventually(lambda: "before" in seen)
    private_redis.stop()
    private_redis.start()
    await bus.publish(requested("after"))
    await eventually(lambda: "after" in seen, timeout=30)
    await bus.publish(requested("before"))  # a new event id: handled, not a duplicate
    await eventually(lambda: seen.count("before") == 2)
