"""Helpers for the signaling tests: a device on a real WebSocket, a raw event tap on the
broker, the platform facts that let one user call another (through the real policy), the
signaling stack of an end-to-end test (``World``, the ``worlds`` fixture) and signaling
instances built in this process (``InProcess``, the ``in_process`` fixture)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import httpx
import websockets
from aio_pika.abc import AbstractIncomingMessage
from redis.asyncio import Redis

from services.signaling.calls import CallService
from services.signaling.presence import Hub
from services.signaling.settings import SignalingSettings
from services.signaling.store import CallStore
from shared import redis as shared_redis
from shared.bus import Bus
from shared.contracts import CallCancelled, Event, EventType, Exchange
from shared.groups import GroupDirectory
from shared.media_registry import MediaNode, MediaRegistry
from shared.settings import CommonSettings
from tests.support.waiting import eventually
from tools.stack import ServiceProcess

NODE = MediaNode(node_id="media-test-1", url="http://127.0.0.1:9/", capacity=50, load=0)
"""The media node the registry hands out where no media service runs (nothing answers at
its URL): signaling only needs it registered to accept a call."""


@dataclass
class Device:
    """One device's WebSocket; every message it receives is kept in order."""

    user: str
    device_id: str
    ws: Any
    received: list[dict[str, Any]] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, base_url: str, token: str, user: str, device_id: str) -> Device:
        url = base_url.replace("http://", "ws://") + f"/v1/ws?token={token}&device_id={device_id}"
        ws = await websockets.connect(url, open_timeout=10, max_size=2**24)
        device = cls(user, device_id, ws)
        device._reader = asyncio.create_task(device._read())
        return device

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self.received.append(json.loads(raw))
                self._arrived.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed.set()
            self._arrived.set()

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))

    def matching(self, **want: Any) -> list[dict[str, Any]]:
        return [m for m in self.received if all(m.get(k) == v for k, v in want.items())]

    async def expect(self, timeout: float = 15.0, **want: Any) -> dict[str, Any]:
        """The first received message with all of ``want``'s fields (waits for it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = self.matching(**want)
            if found:
                return found[0]
            remaining = deadline - loop.time()
            if remaining <= 0 or (self.closed.is_set() and not self.matching(**want)):
                if self.closed.is_set() and remaining > 0:
                    raise AssertionError(f"{self.device_id}: socket closed; got {self.received}")
                raise AssertionError(
                    f"{self.device_id}: no message like {want} in {timeout}s; got {self.received}"
                )
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def close(self) -> None:
        await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader


SIGNALING_EVENTS = (
    EventType.CALL_REQUESTED,
    EventType.CALL_RINGING,
    EventType.CALL_ACCEPTED,
    EventType.CALL_DECLINED,
    EventType.CALL_CANCELLED,
    EventType.CALL_MISSED,
    EventType.CALL_ENDED,
    EventType.CALL_PARTICIPANT_JOINED,
    EventType.CALL_PARTICIPANT_LEFT,
)


@dataclass
class EventTap:
    """A plain queue on the ``calls`` exchange: sees every copy published (no dedup)."""

    messages: list[dict[str, Any]] = field(default_factory=list)

    def of(self, event_type: EventType, call_id: str) -> list[dict[str, Any]]:
        return [
            m
            for m in self.messages
            if m["type"] == event_type.value and m.get("call_id") == call_id
        ]

    async def settle(self, publish: Callable[[Event], Awaitable[None]]) -> None:
        """Returns once every event published (and confirmed) before now is here: a marker
        published now queues behind them all, and this waits for it. What a negative check
        waits for instead of sleeping: anything extra published so far has arrived."""
        marker = CallCancelled(call_id=f"marker-{uuid.uuid4().hex}", caller="m", callee="m")
        await publish(marker)
        await eventually(lambda: self.of(EventType.CALL_CANCELLED, marker.call_id))


@contextlib.asynccontextmanager
async def event_tap(
    rabbitmq_url: str, namespace: str, events: tuple[EventType, ...] = SIGNALING_EVENTS
) -> AsyncIterator[EventTap]:
    tap = EventTap()
    connection = await aio_pika.connect_robust(rabbitmq_url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            f"{namespace}.{Exchange.CALLS.value}", aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for event_type in events:
            await queue.bind(exchange, routing_key=event_type.value)

        async def on_message(message: AbstractIncomingMessage) -> None:
            async with message.process():
                tap.messages.append(json.loads(message.body))

        await queue.consume(on_message)
        yield tap
    finally:
        await connection.close()


async def publish_event(rabbitmq_url: str, namespace: str, event: Event) -> None:
    """``event`` on the namespace's ``calls`` exchange, as a service's bus publishes it."""
    connection = await aio_pika.connect_robust(rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            f"{namespace}.{Exchange.CALLS.value}", aio_pika.ExchangeType.TOPIC, durable=True
        )
        await exchange.publish(
            aio_pika.Message(event.to_json(), message_id=str(event.event_id)),
            routing_key=event.type.value,
        )


async def allow_call(
    policy: httpx.AsyncClient, platform_token: str, caller: str, callee: str
) -> None:
    """Make ``caller`` premium, let ``callee`` have DMed them and follow them."""
    headers = {"Authorization": f"Bearer {platform_token}"}
    for method, path, body in (
        ("PUT", f"/v1/platform/users/{caller}", {"premium": True, "verified": False}),
        ("POST", "/v1/platform/dms", {"sender": callee, "recipient": caller}),
        ("PUT", f"/v1/platform/users/{callee}/following/{caller}", None),
    ):
        response = await policy.request(method, path, json=body, headers=headers)
        assert response.status_code < 300, (path, response.status_code, response.text)


async def place_and_accept(
    http: httpx.AsyncClient,
    token: Callable[[str], str],
    caller: Device,
    callee: Device,
    media: str = "audio",
) -> tuple[str, httpx.Response]:
    """``caller`` places a call from its device, ``callee``'s device rings and accepts it.

    Returns the call id and the accept response (the callee's media hand-off)."""
    placed = await http.post(
        "/v1/calls",
        json={"callee": callee.user, "media": media, "device_id": caller.device_id},
        headers={"Authorization": f"Bearer {token(caller.user)}"},
    )
    assert placed.status_code == 202, placed.text
    call_id = str(placed.json()["call_id"])
    await callee.expect(type="call.incoming", call_id=call_id)
    accepted = await http.post(
        f"/v1/calls/{call_id}/accept",
        json={"device_id": callee.device_id},
        headers={"Authorization": f"Bearer {token(callee.user)}"},
    )
    assert accepted.status_code == 200, accepted.text
    return call_id, accepted


@dataclass
class World:
    """One end-to-end test's stack: signaling processes (policy and notifications where
    asked for) on the test's namespace, a tap on the events they publish, and the devices
    and HTTP clients the test opens (closed after it)."""

    signaling: list[ServiceProcess]
    policy: ServiceProcess | None
    notifications: ServiceProcess | None
    tap: EventTap
    token: Callable[..., str]
    settings: CommonSettings
    redis: Redis
    devices: list[Device] = field(default_factory=list)
    clients: list[httpx.AsyncClient] = field(default_factory=list)

    @property
    def namespace(self) -> str:
        return self.settings.namespace

    @property
    def registry(self) -> MediaRegistry:
        return MediaRegistry(self.redis, self.settings)

    @property
    def groups(self) -> GroupDirectory:
        return GroupDirectory(self.redis, self.settings)

    def http(self, instance: int = 0) -> httpx.AsyncClient:
        client = httpx.AsyncClient(base_url=self.signaling[instance].url, timeout=15)
        self.clients.append(client)
        return client

    def h(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user)}"}

    async def device(self, user: str, device_id: str, instance: int = 0) -> Device:
        device = await Device.connect(
            self.signaling[instance].url, self.token(user), user, device_id
        )
        self.devices.append(device)
        return device

    async def allow(self, caller: str, callee: str) -> None:
        """The platform facts that let ``caller`` call ``callee`` (through the real policy)."""
        assert self.policy is not None, "this world has no policy"
        async with httpx.AsyncClient(base_url=self.policy.url, timeout=15) as policy:
            await allow_call(policy, self.token("platform-svc", scope="platform"), caller, callee)

    async def place(
        self, caller: str, callee: str, *, instance: int = 0, media: str = "audio", **extra: Any
    ) -> str:
        """``caller`` places a call to ``callee``: its id (the call is requested)."""
        response = await self.http(instance).post(
            "/v1/calls", json={"callee": callee, "media": media, **extra}, headers=self.h(caller)
        )
        assert response.status_code == 202, response.text
        body = response.json()
        assert body["state"] == "requested"
        return str(body["call_id"])

    async def publish(self, event: Event) -> None:
        await publish_event(self.settings.rabbitmq_url, self.namespace, event)

    async def close(self) -> None:
        for device in self.devices:
            await device.close()
        for client in self.clients:
            await client.aclose()


async def worlds(
    spawn: Callable[..., ServiceProcess],
    token: Callable[..., str],
    settings: CommonSettings,
    redis_client: Redis,
) -> AsyncIterator[Callable[..., Any]]:
    """The ``worlds`` fixture: ``await worlds(2, policy=True, RING_TIMEOUT_S="3")`` is a
    ``World`` (or ``cls``) of that many signaling processes, the environment given to them
    only; every one closed after the test.

    ``node`` is registered for ten minutes (None: no node); ``events`` are what the tap
    receives."""
    redis = redis_client
    async with contextlib.AsyncExitStack() as stack:

        async def make(
            instances: int = 1,
            *,
            cls: type[World] = World,
            policy: bool = False,
            notifications: bool = False,
            node: MediaNode | None = NODE,
            events: tuple[EventType, ...] = SIGNALING_EVENTS,
            **env: str,
        ) -> World:
            policy_proc = spawn("policy", wait=False) if policy else None
            notifications_proc = spawn("notifications", wait=False) if notifications else None
            procs = [spawn("signaling", wait=False, **env) for _ in range(instances)]
            for proc in (policy_proc, notifications_proc, *procs):
                if proc is not None:
                    proc.wait_ready()
            if node is not None:
                await MediaRegistry(redis, settings).heartbeat(node, ttl_s=600)
            tap = await stack.enter_async_context(
                event_tap(settings.rabbitmq_url, settings.namespace, events)
            )
            world = cls(procs, policy_proc, notifications_proc, tap, token, settings, redis)
            stack.push_async_callback(world.close)
            return world

        yield make


@dataclass
class InProcess:
    """One signaling instance built in this process (its own Redis and broker connections,
    no background loops): what a test drives call by call, in the order it chooses."""

    service: CallService
    store: CallStore

    async def published_all(self) -> bool:
        """Every event committed (by any instance) is published: the outbox is empty."""
        return await self.store.redis.hlen(self.store.outbox_key) == 0  # type: ignore[misc,no-any-return]

    async def settle(self, tap: EventTap) -> None:
        """Returns once every event committed so far is on ``tap``."""
        await eventually(self.published_all)
        await tap.settle(self.service.bus.publish)


async def in_process(make_settings: Callable[..., Any]) -> AsyncIterator[Callable[..., Any]]:
    """The ``in_process`` fixture: ``await in_process(2)`` is that many ``InProcess``
    instances (``sig-0``, ``sig-1``...) of the test's namespace, with ``NODE`` registered
    (``await in_process(1, call_retention_s=...)``: with those settings);
    closed after the test. Their outbox lease is short (500 ms), so a test can outlive one."""
    opened: list[tuple[Bus, Redis]] = []

    async def make(count: int = 1, **overrides: Any) -> list[InProcess]:
        out = []
        for index in range(count):
            settings: SignalingSettings = make_settings(
                SignalingSettings,
                **{"instance_id": f"sig-{index}", "outbox_lease_ms": 500, **overrides},
            )
            redis = shared_redis.connect(settings, name=f"test-signaling-{index}")
            bus = Bus(settings, redis, "signaling")
            await asyncio.wait_for(bus.start(), 15)
            opened.append((bus, redis))
            store = CallStore(
                redis,
                settings,
                outbox_lease_ms=settings.outbox_lease_ms,
                call_retention_s=settings.call_retention_s,
            )
            registry = MediaRegistry(redis, settings)
            await registry.heartbeat(NODE, ttl_s=300)
            hub = Hub(store, bus, settings.instance_id)
            out.append(InProcess(CallService(settings, store, hub, bus, registry), store))
        return out

    try:
        yield make
    finally:
        for bus, redis in opened:
            await bus.close()
            await redis.aclose()
