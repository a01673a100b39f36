"""The event bus: the only module that imports aio-pika.

Topology (names carry the deployment's namespace prefix, if any):

- ``calls`` and ``platform``: durable topic exchanges; the routing key is the event type.
- ``<service>.<consumer>``: a durable queue per consuming service (``Scope.SERVICE``:
  one instance of the service handles each event), or ``<service>.<consumer>.<instance>``,
  exclusive to one process (``Scope.INSTANCE``: every instance receives each event).
- ``<queue>.retry``: where a failed delivery waits ``BUS_RETRY_DELAY_MS`` before it is
  dead-lettered back into its queue; after ``BUS_MAX_ATTEMPTS`` it goes to
- ``<queue>.dlq``: parked with the error in the ``x-dmcall-error`` header, for a person.
- ``instances``: a direct exchange for messages meant for one process (a device's socket
  lives on one signaling instance); each instance's inbox is bound with
  ``<service>.<instance_id>``.

Delivery guarantees: messages are persistent and published with publisher confirms;
a consumer acks only after its handler succeeded (or the message was parked), with a
bounded prefetch. The broker delivers at least once, so each consumer deduplicates by
``event_id`` in Redis: the event is claimed with ``SET NX PX`` while it is handled and
marked done for ``BUS_DEDUP_TTL_S``. A handler whose effect is not idempotent makes it
exactly-once by committing it with :meth:`Delivery.transaction`, in one Redis transaction
with the done mark. A consumer whose handlers commit through a script of their own
subscribes with ``marks_done``: the bus neither claims nor marks, the handler's script
checks and writes :attr:`Delivery.done_mark` in its commit (one round trip, not three),
and raises :class:`AlreadyHandled` when it finds it done. The connection is robust: after
a broker restart or a dropped connection it reconnects and restores its queues and
consumers; publishing waits for it.

The W3C trace context travels in the AMQP headers (``traceparent``), so a consumer's
span continues the publisher's trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from shared import telemetry
from shared.clock import wait_set
from shared.contracts import Event, EventDecodeError, EventType, Exchange, parse_event
from shared.redis import KeySpace
from shared.settings import CommonSettings

log = logging.getLogger(__name__)

ATTEMPT_HEADER = "x-dmcall-attempt"
ERROR_HEADER = "x-dmcall-error"
ORIGIN_HEADER = "x-dmcall-origin-queue"
INSTANCES_EXCHANGE = "instances"

_TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)

Handler = Callable[[Any, "Delivery"], Awaitable[None]]
InstanceHandler = Callable[[bytes, Mapping[str, Any]], Awaitable[None]]


class Scope(StrEnum):
    SERVICE = "service"
    """One instance of the service handles each event (a shared durable queue)."""
    INSTANCE = "instance"
    """Every instance handles each event (an exclusive queue per process)."""


class BusUnavailable(RuntimeError):
    """The broker did not take a message within the publish timeout."""


class AlreadyHandled(Exception):
    """Raised inside a handler's transaction when another delivery already committed."""


@dataclass
class Subscription:
    name: str
    handlers: dict[EventType, Handler]
    exchanges: dict[EventType, Exchange]
    scope: Scope
    marks_done: bool = False
    queue_name: str = ""
    queue: AbstractQueue | None = None


@dataclass
class Delivery:
    """What a handler knows about the delivery it is handling."""

    event: Event
    attempt: int
    redelivered: bool
    consumer: str
    _redis: Redis
    _done_key: str
    _done_ttl_s: int
    committed: bool = field(default=False)

    @property
    def done_mark(self) -> tuple[str, int]:
        """The key that marks this event done for this consumer, and for how many
        seconds: a ``marks_done`` consumer's commit returns early if it holds ``done``, else
        sets it to ``done`` for that long together with its writes."""
        return self._done_key, self._done_ttl_s

    def marked_done(self) -> None:
        """The handler wrote :attr:`done_mark` itself, with its last write (while the bus's
        claim serializes the deliveries of this event): the bus writes no mark of its own."""
        self.committed = True

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Pipeline]:
        """A MULTI/EXEC pipeline that also marks this event done for this consumer.

        The handler queues its writes on the yielded pipeline; they commit together with
        the done mark, or not at all. If another delivery of the same event committed
        first, the handler is stopped with :class:`AlreadyHandled`.
        """
        async with self._redis.pipeline(transaction=True) as pipe:
            await pipe.watch(self._done_key)
            if await pipe.get(self._done_key) == b"done":
                raise AlreadyHandled(str(self.event.event_id))
            pipe.multi()
            yield pipe
            pipe.set(self._done_key, b"done", ex=self._done_ttl_s)
            try:
                await pipe.execute()
            except WatchError as exc:
                raise AlreadyHandled(str(self.event.event_id)) from exc
        self.committed = True


class Bus:
    """One service's connection to the broker: publish events, consume them, reach instances."""

    def __init__(
        self,
        settings: CommonSettings,
        redis: Redis,
        service: str,
        *,
        publish_timeout_s: float = 15.0,
    ) -> None:
        self.settings = settings
        self.service = service
        self.instance_id = settings.instance_id
        self._redis = redis
        self._keys = KeySpace(settings, "bus")
        self._publish_timeout_s = publish_timeout_s
        self._subscriptions: list[Subscription] = []
        self._instance_handler: InstanceHandler | None = None
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._consume_channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._ready = asyncio.Event()
        self._tracer = telemetry.tracer("dmcall.bus")

    # ------------------------------------------------------------------ set-up

    def subscribe(
        self,
        name: str,
        handlers: Mapping[type[Event], Handler],
        *,
        scope: Scope = Scope.SERVICE,
        marks_done: bool = False,
    ) -> None:
        """Register a consumer before :meth:`start`. ``handlers`` maps event model to handler.
        With ``marks_done`` the handlers commit :attr:`Delivery.done_mark` themselves (see
        the module's docstring); a handler that commits nothing leaves no mark, so it must
        be idempotent on its own."""
        by_type: dict[EventType, Handler] = {}
        exchanges: dict[EventType, Exchange] = {}
        for model, handler in handlers.items():
            event_type = model.model_fields["type"].default
            by_type[event_type] = handler
            exchanges[event_type] = model.exchange
        self._subscriptions.append(Subscription(name, by_type, exchanges, scope, marks_done))

    def on_instance_message(self, handler: InstanceHandler) -> None:
        """Receive messages sent to this process with :meth:`send_to_instance`."""
        self._instance_handler = handler

    @property
    def ready(self) -> bool:
        return (
            self._ready.is_set()
            and self._connection is not None
            and not self._connection.is_closed
            and self._publish_channel is not None
            and not self._publish_channel.is_closed
        )

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def start(self) -> None:
        """Connect (retrying until the broker answers), declare topology, start consumers."""
        delay = 0.2
        while True:
            try:
                self._connection = await aio_pika.connect_robust(
                    self.settings.rabbitmq_url,
                    client_properties={
                        "connection_name": f"{self.settings.prefixed(self.service)}:"
                        f"{self.instance_id}"
                    },
                    timeout=5,
                )
                break
            except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
                log.warning("broker not reachable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._publish_channel = await self._connection.channel(publisher_confirms=True)
        self._consume_channel = await self._connection.channel(publisher_confirms=True)
        await self._consume_channel.set_qos(prefetch_count=self.settings.bus_prefetch)
        for name in (Exchange.CALLS, Exchange.PLATFORM):
            self._exchanges[name] = await self._publish_channel.declare_exchange(
                self.settings.prefixed(name), aio_pika.ExchangeType.TOPIC, durable=True
            )
        self._exchanges[INSTANCES_EXCHANGE] = await self._publish_channel.declare_exchange(
            self.settings.prefixed(INSTANCES_EXCHANGE), aio_pika.ExchangeType.DIRECT, durable=True
        )
        for sub in self._subscriptions:
            await self._declare_subscription(sub)
        if self._instance_handler is not None:
            await self._declare_instance_inbox()
        self._ready.set()
        log.info("bus ready: %d consumers", len(self._subscriptions))

    async def close(self) -> None:
        self._ready.clear()
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def _declare_subscription(self, sub: Subscription) -> None:
        assert self._consume_channel is not None
        channel = self._consume_channel
        base = self.settings.prefixed(f"{self.service}.{sub.name}")
        expiry: dict[str, Any] = {}
        if self.settings.bus_queue_expires_ms:
            expiry["x-expires"] = self.settings.bus_queue_expires_ms
        if sub.scope is Scope.SERVICE:
            sub.queue_name = base
            args: dict[str, Any] = dict(expiry)
            if self.settings.bus_queue_type == "quorum":
                args["x-queue-type"] = "quorum"
            queue = await channel.declare_queue(base, durable=True, arguments=args)
            retry_durable = True
            retry_args: dict[str, Any] = dict(args)
        else:
            sub.queue_name = f"{base}.{self.instance_id}"
            queue = await channel.declare_queue(sub.queue_name, exclusive=True, auto_delete=True)
            retry_durable = False
            retry_args = {"x-expires": 600_000}
        await channel.declare_queue(
            f"{sub.queue_name}.retry",
            durable=retry_durable,
            arguments={
                **retry_args,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": sub.queue_name,
            },
        )
        # The dead-letter queue is per consumer, durable even for instance queues: what is
        # parked there outlives the process, for a person to read.
        await channel.declare_queue(f"{base}.dlq", durable=True, arguments=expiry)
        for event_type, exchange in sub.exchanges.items():
            ex = await channel.get_exchange(self.settings.prefixed(exchange), ensure=False)
            await queue.bind(ex, routing_key=event_type.value)
        sub.queue = queue

        async def on_message(message: AbstractIncomingMessage) -> None:
            await self._on_message(sub, message)

        await queue.consume(on_message)

    async def _declare_instance_inbox(self) -> None:
        assert self._consume_channel is not None and self._instance_handler is not None
        name = self.settings.prefixed(f"{self.service}.inbox.{self.instance_id}")
        queue = await self._consume_channel.declare_queue(name, exclusive=True, auto_delete=True)
        ex = await self._consume_channel.get_exchange(
            self.settings.prefixed(INSTANCES_EXCHANGE), ensure=False
        )
        await queue.bind(ex, routing_key=f"{self.service}.{self.instance_id}")
        handler = self._instance_handler

        async def on_message(message: AbstractIncomingMessage) -> None:
            try:
                await handler(message.body, message.headers or {})
            except Exception:
                # Instance messages are transient (a socket push): log, never loop.
                log.exception("instance message handler failed")
            await message.ack()

        await queue.consume(on_message)

    # ------------------------------------------------------------------ publishing

    async def publish(self, event: Event) -> None:
        """Publish one event to its exchange, routing key = its type; returns once confirmed."""
        with telemetry.span(
            self._tracer,
            f"{event.type.value} publish",
            kind=SpanKind.PRODUCER,
            attributes=lambda: _event_attributes(event),
        ):
            headers: dict[str, Any] = {}
            telemetry.inject_headers(headers)
            message = aio_pika.Message(
                event.to_json(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=str(event.event_id),
                type=event.type.value,
                headers=headers,
            )
            await self._publish(event.exchange.value, message, event.type.value)
        telemetry.BUS_PUBLISHED.labels(self.service, event.type.value).inc()

    async def send_to_instance(
        self,
        service: str,
        instance_id: str,
        body: bytes,
        headers: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> None:
        """A transient message for one process (it is gone if that process is). It waits
        for the broker at most ``timeout_s`` (default: the publish timeout), then raises
        :class:`BusUnavailable`: a push that late is worth less than the wait."""
        hdrs = dict(headers or {})
        telemetry.inject_headers(hdrs)
        message = aio_pika.Message(
            body, delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT, headers=hdrs
        )
        await self._publish(
            INSTANCES_EXCHANGE, message, f"{service}.{instance_id}", timeout_s=timeout_s
        )

    async def _publish(
        self,
        exchange: str,
        message: aio_pika.Message,
        routing_key: str,
        *,
        timeout_s: float | None = None,
    ) -> None:
        deadline = time.monotonic() + (self._publish_timeout_s if timeout_s is None else timeout_s)
        delay = 0.05
        while True:
            try:
                if not self._ready.is_set():
                    remaining = max(deadline - time.monotonic(), 0.01)
                    if not await wait_set(self._ready, remaining):
                        raise TimeoutError("the broker connection is not ready")
                await self._exchanges[exchange].publish(message, routing_key=routing_key)
                return
            except (
                TimeoutError,
                aio_pika.exceptions.AMQPError,
                ConnectionError,
                RuntimeError,
            ) as exc:
                if time.monotonic() >= deadline:
                    raise BusUnavailable(f"could not publish {routing_key}: {exc}") from exc
                log.warning("publish of %s failed (%s); retrying", routing_key, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _publish_default(self, queue: str, message: aio_pika.Message) -> None:
        assert self._consume_channel is not None
        await self._consume_channel.default_exchange.publish(message, routing_key=queue)

    # ------------------------------------------------------------------ consuming

    def _done_key(self, sub: Subscription, event: Event) -> str:
        # dmcall:bus:seen:<service>.<consumer>:<event_id>
        #   -> "processing" while claimed (PX claim ttl) | "done" once handled (EX dedup ttl)
        return self._keys("seen", f"{self.service}.{sub.name}", str(event.event_id))

    async def _on_message(self, sub: Subscription, message: AbstractIncomingMessage) -> None:
        headers = message.headers or {}
        attempt = _int_header(headers.get(ATTEMPT_HEADER), 1)
        try:
            event = parse_event(message.body)
        except EventDecodeError as exc:
            log.error("poison message on %s: %s", sub.queue_name, exc)
            await self._park(sub, message, f"undecodable: {exc}", attempt)
            telemetry.BUS_HANDLED.labels(
                self.service, sub.name, message.type or "?", "dead_lettered"
            ).inc()
            return
        handler = sub.handlers.get(event.type)
        if handler is None:  # bound by mistake or an old binding: nothing to do
            await message.ack()
            return
        parent = telemetry.extract_context(headers)
        with telemetry.span(
            self._tracer,
            f"{event.type.value} process",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=lambda: {**_event_attributes(event), "messaging.consumer": sub.name},
        ) as span:
            outcome = await self._handle(sub, message, event, handler, attempt, span)
        telemetry.BUS_HANDLED.labels(self.service, sub.name, event.type.value, outcome).inc()

    async def _handle(
        self,
        sub: Subscription,
        message: AbstractIncomingMessage,
        event: Event,
        handler: Handler,
        attempt: int,
        span: trace.Span,
    ) -> str:
        key = self._done_key(sub, event)
        claims = not sub.marks_done
        try:
            claimed = not claims or await self._redis.set(
                key, b"processing", nx=True, px=self.settings.bus_claim_ttl_ms
            )
            if not claimed:
                state = await self._redis.get(key)
                if state == b"done":
                    await message.ack()
                    return "duplicate"
                # Another delivery of this event is being handled (or its handler died and
                # the claim has not expired yet): look again after the retry delay.
                await self._retry(sub, message, attempt, "event is being handled elsewhere")
                return "deferred"
        except _TRANSIENT as exc:
            return await self._requeue_transient(message, exc)

        delivery = Delivery(
            event=event,
            attempt=attempt,
            redelivered=bool(message.redelivered),
            consumer=sub.name,
            _redis=self._redis,
            _done_key=key,
            _done_ttl_s=self.settings.bus_dedup_ttl_s,
        )
        started = time.perf_counter()
        try:
            await handler(event, delivery)
        except AlreadyHandled:
            await message.ack()
            return "duplicate"
        except _TRANSIENT as exc:
            if claims:
                await _best_effort(self._redis.delete(key))
            return await self._requeue_transient(message, exc)
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            if claims:
                await _best_effort(self._redis.delete(key))
            error = f"{type(exc).__name__}: {exc}"
            if attempt >= self.settings.bus_max_attempts:
                log.error("dead-lettering %s after %d attempts: %s", event.type, attempt, error)
                await self._park(sub, message, error, attempt)
                return "dead_lettered"
            log.warning("handler for %s failed (attempt %d): %s", event.type, attempt, error)
            await self._retry(sub, message, attempt + 1, error)
            return "retried"
        finally:
            telemetry.BUS_HANDLER_LATENCY.labels(self.service, sub.name).observe(
                time.perf_counter() - started
            )
        try:
            if claims and not delivery.committed:
                await self._redis.set(key, b"done", ex=self.settings.bus_dedup_ttl_s)
        except _TRANSIENT as exc:
            # The effect happened but could not be recorded: a redelivery would repeat it,
            # which is what at-least-once allows; handlers are idempotent for this case.
            log.warning("could not mark %s done: %s", event.event_id, exc)
        await message.ack()
        return "ok"

    async def _requeue_transient(self, message: AbstractIncomingMessage, exc: BaseException) -> str:
        log.warning("infrastructure error, requeueing: %s", exc)
        await asyncio.sleep(0.5)
        await message.nack(requeue=True)
        return "requeued"

    async def _retry(
        self, sub: Subscription, message: AbstractIncomingMessage, attempt: int, error: str
    ) -> None:
        await self._move(
            message,
            f"{sub.queue_name}.retry",
            {ATTEMPT_HEADER: attempt, ERROR_HEADER: error[:1000]},
            expiration=self.settings.bus_retry_delay_ms / 1000,
        )

    async def _park(
        self, sub: Subscription, message: AbstractIncomingMessage, error: str, attempt: int
    ) -> None:
        base = self.settings.prefixed(f"{self.service}.{sub.name}")
        await self._move(
            message,
            f"{base}.dlq",
            {ATTEMPT_HEADER: attempt, ERROR_HEADER: error[:4000], ORIGIN_HEADER: sub.queue_name},
        )

    async def _move(
        self,
        message: AbstractIncomingMessage,
        queue: str,
        headers: dict[str, int | str],
        expiration: float | None = None,
    ) -> None:
        """Publish a persistent copy of ``message`` to ``queue``, its headers updated with
        ``headers``, then ack the original."""
        copy = aio_pika.Message(
            message.body,
            content_type=message.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            type=message.type,
            headers={**(message.headers or {}), **headers},
            expiration=expiration,
        )
        await self._publish_default(queue, copy)
        await message.ack()


def _event_attributes(event: Event) -> dict[str, str]:
    attrs = {
        "messaging.system": "rabbitmq",
        "messaging.destination.name": event.exchange.value,
        "messaging.rabbitmq.destination.routing_key": event.type.value,
        "messaging.message.id": str(event.event_id),
    }
    call_id = getattr(event, "call_id", None)
    if call_id:
        attrs["dmcall.call_id"] = str(call_id)
    return attrs


def _int_header(value: object, default: int) -> int:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return default


async def _best_effort(awaitable: Awaitable[Any]) -> None:
    with contextlib.suppress(*_TRANSIENT):
        await awaitable
