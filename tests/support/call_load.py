"""Calls placed over and over through the public API while a test breaks a backing server
(tests/test_redis_failover.py kills the Redis primary, tests/test_broker_restart.py the
broker): each caller places a call to its own callee, waits for it to ring, hangs up,
pauses, and again; every attempt records what the API answered and when."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from redis.asyncio import Redis

from shared.media_registry import MediaNode, MediaRegistry
from shared.settings import CommonSettings
from tests.conftest import auth
from tests.support.signaling import allow_call


@dataclass
class Attempt:
    """One call placed by one caller, and what the API told the users about it."""

    caller: str
    callee: str
    sent_at: float
    placed_at: float = 0.0  # when the answer to the placement came
    placed_status: int | None = None  # None: the request itself failed
    call_id: str | None = None
    rang_at: float | None = None  # when the caller first saw it ringing
    hangup_status: int | None = None
    error: str = ""

    @property
    def placed(self) -> bool:
        return self.placed_status == 202

    @property
    def rang(self) -> bool:
        return self.rang_at is not None


@dataclass
class Load:
    """``caller(i)`` calls ``callee<i>`` as ``caller<i>`` until ``stop`` is set; a placed
    call is watched for up to ``ring_wait_s`` for policy's verdict, then hung up."""

    signaling: httpx.AsyncClient
    token: Callable[..., str]
    ring_wait_s: float
    pause_s: float
    attempts: list[Attempt] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def caller(self, index: int) -> None:
        while not self.stop.is_set():
            attempt = Attempt(f"caller{index}", f"callee{index}", time.monotonic())
            self.attempts.append(attempt)
            try:
                await self.one_call(attempt)
            except httpx.HTTPError as exc:
                attempt.error = type(exc).__name__
            attempt.placed_at = attempt.placed_at or time.monotonic()
            await asyncio.sleep(self.pause_s)

    async def one_call(self, attempt: Attempt) -> None:
        headers = auth(self.token(attempt.caller))
        placed = await self.signaling.post(
            "/v1/calls", json={"callee": attempt.callee, "media": "audio"}, headers=headers
        )
        attempt.placed_status, attempt.placed_at = placed.status_code, time.monotonic()
        if placed.status_code != 202:
            return
        attempt.call_id = str(placed.json()["call_id"])
        # Policy's verdict makes it ring; then the caller hangs up (a cancel).
        deadline = time.monotonic() + self.ring_wait_s
        while time.monotonic() < deadline:
            seen = await self.signaling.get(f"/v1/calls/{attempt.call_id}", headers=headers)
            state = seen.json()["state"] if seen.status_code == 200 else None
            if state not in (None, "requested"):
                attempt.rang_at = time.monotonic() if state == "ringing" else None
                break
            await asyncio.sleep(0.05)
        hung_up = await self.signaling.post(f"/v1/calls/{attempt.call_id}/hangup", headers=headers)
        attempt.hangup_status = hung_up.status_code


async def prepare(
    policy_url: str,
    token: Callable[..., str],
    redis: Redis,
    settings: CommonSettings,
    node: MediaNode,
    pairs: int,
) -> None:
    """A media node for the calls, and ``caller<i>`` allowed to call ``callee<i>``."""
    await MediaRegistry(redis, settings).heartbeat(node, ttl_s=600)
    async with httpx.AsyncClient(base_url=policy_url, timeout=15) as policy:
        platform = token("platform-svc", scope="platform")
        for i in range(pairs):
            await allow_call(policy, platform, f"caller{i}", f"callee{i}")
