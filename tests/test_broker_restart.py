"""The broker crashes under load and comes back: nothing acknowledged is lost.

A private RabbitMQ node (tests/support/rabbitmq_server.py; the shared broker is never
touched) with quorum queues, the production setting; real policy and signaling processes
on it; calls placed through the public API, each waiting for its ring, while the node is
SIGKILLed and started again on the same data directory. The services reconnect by
themselves (no restart), and every call answered ``202`` rings: an event the broker had
confirmed is in its quorum queue after the restart, and one it had not is still in
signaling's outbox, published again once the broker answers. What the crash cost (how
long placing was refused, how late the rings of the calls placed meanwhile came) is
printed, not asserted; docs/operations.md ("RabbitMQ restarts") records a run.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from shared import redis as shared_redis
from shared.media_registry import MediaNode
from shared.settings import CommonSettings
from tests.support.call_load import Attempt, Load, prepare
from tests.support.rabbitmq_server import PrivateRabbit
from tests.support.waiting import eventually
from tools.stack import ServiceProcess

pytestmark = pytest.mark.e2e

PAIRS = 8  # callers, each calling its own callee
PAUSE_S = 0.2  # between one caller's calls
BEFORE_KILL_S = 2.0
DOWN_S = 1.0  # the broker stays dead this long, then starts (~5-10 s to take connections)
AFTER_BACK_S = 2.0
RING_WAIT_S = 60.0  # a call placed while the broker is away rings once it is back
NODE = MediaNode(node_id="media-broker-1", url="http://127.0.0.1:9/", capacity=50, load=0)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateRabbit]:
    node = PrivateRabbit(tmp_path)
    node.start()
    try:
        yield node
    finally:
        node.stop()


async def test_the_services_carry_on_through_a_broker_crash_and_lose_no_call(
    broker: PrivateRabbit,
    spawn: Callable[..., ServiceProcess],
    token: Callable[..., str],
    make_settings: Callable[..., CommonSettings],
) -> None:
    env = {"RABBITMQ_URL": broker.url, "BUS_QUEUE_TYPE": "quorum"}
    settings = make_settings(rabbitmq_url=broker.url)
    policy = spawn("policy", **env)
    signaling = spawn("signaling", RING_TIMEOUT_S="90", CALLS_PER_MINUTE="1000", **env)
    redis = shared_redis.connect(settings, name="test-broker-restart")
    http = httpx.AsyncClient(base_url=signaling.url, timeout=30)
    try:
        await prepare(policy.url, token, redis, settings, NODE, PAIRS)
        load = Load(http, token, ring_wait_s=RING_WAIT_S, pause_s=PAUSE_S)
        first = Attempt("caller0", "callee0", time.monotonic())
        await load.one_call(first)
        assert first.rang and first.hangup_status == 200, first
        workers = [asyncio.create_task(load.caller(i)) for i in range(PAIRS)]
        try:
            await asyncio.sleep(BEFORE_KILL_S)
            broker.kill()
            killed_at = time.monotonic()
            await asyncio.sleep(DOWN_S)
            await asyncio.to_thread(broker.start)
            back_at = time.monotonic()

            async def ready_again() -> bool:
                for proc in (policy, signaling):
                    async with httpx.AsyncClient(base_url=proc.url, timeout=5) as client:
                        if (await client.get("/readyz")).status_code != 200:
                            return False
                return True

            await eventually(ready_again, timeout=30, step=0.2)
            ready_at = time.monotonic()
            await asyncio.sleep(AFTER_BACK_S)
        finally:
            load.stop.set()
            await asyncio.gather(*workers)

        print(_report(load.attempts, killed_at, back_at, ready_at))
        for proc in (policy, signaling):
            assert proc.proc is not None and proc.proc.poll() is None, f"{proc.service} died"

        placed = [a for a in load.attempts if a.placed]
        during = [a for a in placed if killed_at <= a.placed_at < ready_at]
        assert len(placed) > PAIRS * 3 and during, "the load did not span the crash"
        # Nothing acknowledged is lost: every call answered 202 rang, those placed while
        # the broker was away included, and each hung up cleanly.
        unrung = [a for a in placed if not a.rang]
        assert not unrung, f"{len(unrung)} placed calls never rang: {unrung[:3]}"
        assert {a.hangup_status for a in placed} == {200}
        # and placing works as before
        check = Attempt("caller0", "callee0", time.monotonic())
        await load.one_call(check)
        assert check.placed and check.rang, check
    finally:
        await http.aclose()
        await redis.aclose()


def _report(attempts: list[Attempt], killed_at: float, back_at: float, ready_at: float) -> str:
    refused = [a for a in attempts if a.placed_at >= killed_at and not a.placed]
    placed = [a for a in attempts if a.placed and a.rang]
    during = [a for a in placed if killed_at <= a.placed_at < ready_at]
    before = sorted(a.rang_at - a.sent_at for a in placed if a.placed_at < killed_at)  # type: ignore[operator]
    late = sorted(a.rang_at - a.placed_at for a in during)  # type: ignore[operator]
    last_refusal = max((a.placed_at for a in refused), default=None)
    lines = [
        "",
        f"Broker crash under load ({PAIRS} callers: place, wait for the ring, hang up):",
        f"  calls attempted {len(attempts)}, placed (202) "
        f"{sum(a.placed for a in attempts)}, rang {len(placed)}",
        f"  broker SIGKILLed, started again {back_at - killed_at:.1f} s later (it was "
        f"dead {DOWN_S:.0f} s, then booting); both services ready "
        f"{ready_at - killed_at:.1f} s after the kill",
        f"  placements refused after the kill: {len(refused)} "
        + str(dict(Counter(str(a.placed_status or a.error) for a in refused)))
        + (f", the last {last_refusal - killed_at:.1f} s after it" if last_refusal else ""),
        f"  calls placed while the broker was away: {len(during)}, each rang "
        + (f"{late[0]:.1f}-{late[-1]:.1f} s after its 202" if late else "(none)"),
        "  place -> ring before the kill: p50 "
        + (f"{before[len(before) // 2] * 1000:.0f} ms" if before else "-"),
    ]
    return "\n".join(lines)
