"""Helpers for the notifications tests: the settings that make a notifications process
quick to retry and give up, the events signaling publishes for one call, and reading a
user's inbox or a device's delivery log over real HTTP."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from shared.contracts import CallRinging, Event, MediaKind
from tests.support.waiting import eventually
from tools.stack import ServiceProcess

Publish = Callable[[Event], Awaitable[None]]
Spawn = Callable[..., ServiceProcess]
"""The ``spawn`` fixture: ``spawn("notifications", **FAST)``."""

FAST = {
    "NOTIFICATIONS_WEBHOOK_ALLOW_PRIVATE": "true",
    "NOTIFICATIONS_SSE_KEEPALIVE_S": "1",
    "NOTIFICATIONS_PUSH_TIMEOUT_S": "1",
    "NOTIFICATIONS_PUSH_INCOMING_CALL_TIMEOUT_S": "1",
    "NOTIFICATIONS_PUSH_BACKOFF_BASE_MS": "100",
    "NOTIFICATIONS_PUSH_BACKOFF_MAX_MS": "400",
    "NOTIFICATIONS_PUSH_MAX_ATTEMPTS": "3",
}
"""Environment of a notifications process under test: private webhook addresses allowed
(the receivers are local), short timeouts and backoff."""


def new_call() -> str:
    return uuid.uuid4().hex


def ringing(call_id: str, caller: str = "alice", callee: str = "bob") -> CallRinging:
    return CallRinging(
        call_id=call_id,
        caller=caller,
        callee=callee,
        media=MediaKind.VIDEO,
        ring_deadline=datetime.now(UTC) + timedelta(minutes=10),
    )


def parties(caller: str = "alice", callee: str = "bob") -> dict[str, str]:
    return {"caller": caller, "callee": callee}


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def inbox(proc: ServiceProcess, token: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=proc.url, timeout=15) as client:
        response = await client.get("/v1/notifications?limit=500", headers=_auth(token))
        assert response.status_code == 200, response.text
        return list(response.json())


async def inbox_has(proc: ServiceProcess, token: str, count: int) -> list[dict[str, Any]]:
    async def check() -> list[dict[str, Any]] | None:
        items = await inbox(proc, token)
        return items if len(items) >= count else None

    return list(await eventually(check))


async def deliveries(client: httpx.AsyncClient, token: str, device_id: str) -> list[Any]:
    response = await client.get(f"/v1/devices/{device_id}/deliveries", headers=_auth(token))
    assert response.status_code == 200, response.text
    return list(response.json())


async def when_outcome(log: Awaitable[list[Any]], outcome: str) -> list[Any] | None:
    """The delivery log, once its newest entry has ``outcome``."""
    entries = await log
    return entries if entries and entries[0]["outcome"] == outcome else None


async def when_removed(response: Awaitable[httpx.Response]) -> dict[str, Any] | None:
    """The device, once it is removed."""
    body = (await response).json()
    return dict(body) if body.get("status") == "removed" else None
