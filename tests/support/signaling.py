"""Helpers for the signaling tests: a device on a real WebSocket, a raw event tap on the
broker, and the platform facts that let one user call another (through the real policy)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import httpx
import websockets
from aio_pika.abc import AbstractIncomingMessage

from shared.contracts import Event, EventType, Exchange


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
)


MEDIA_EVENTS = (
    EventType.CALL_MEDIA_CONNECTED,
    EventType.CALL_MEDIA_FAILED,
    EventType.CALL_MEDIA_PEER,
    EventType.MEDIA_NODE_DRAINING,
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
