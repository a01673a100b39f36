"""Redis failover under load: a private primary, a replica and three Sentinels; real policy
and signaling processes that find the primary through the Sentinels; calls placed (and
cancelled) through the public API while the primary is SIGKILLed.

The services must carry on after the failover without a restart. What the failover cost is
printed, not asserted (docs/operations.md, "Redis failover", records a run): how long placing
failed, and which acknowledged calls the promoted replica never heard of, because
replication is asynchronous and the primary died with the last writes.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.routing import Route

from shared import redis as shared_redis
from shared.media_registry import MediaNode
from shared.service import create_service_app
from shared.settings import CommonSettings
from tests.conftest import auth
from tests.support.call_load import Attempt, Load, prepare
from tests.support.redis_server import PrivateRedis, PrivateSentinel
from tests.support.waiting import eventually
from tools.stack import ServiceProcess, free_port, remove_keys

pytestmark = pytest.mark.e2e

MASTER = "dmcall"
PAIRS = 16  # callers, each calling its own callee: no rate limit, no busy callee
PAUSE_S = 0.25  # between one caller's calls: ~40 calls/s in all
RING_WAIT_S = 2.0  # then the caller cancels
BEFORE_KILL_S = 3.0
AFTER_RECOVERY_S = 3.0
RECOVERY_BOUND_S = 25.0  # generous: Sentinel needs ~1 s to see it down and ~1 s to promote
NODE = MediaNode(node_id="media-failover-1", url="http://127.0.0.1:9/", capacity=50, load=0)


@dataclass
class Cluster:
    primary: PrivateRedis
    replica: PrivateRedis
    sentinels: list[PrivateSentinel]

    @property
    def sentinel_list(self) -> str:
        return ",".join(s.address for s in self.sentinels)


def _sentinel_view(sentinel: PrivateSentinel) -> dict[str, str]:
    lines = sentinel.cli("sentinel", "master", MASTER).splitlines()
    return dict(zip(lines[::2], lines[1::2], strict=False))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    primary = PrivateRedis(tmp_path)
    primary.start()
    replica = PrivateRedis(tmp_path, replica_of=primary)
    sentinels = [PrivateSentinel(tmp_path, primary, master=MASTER) for _ in range(3)]
    started: list[PrivateRedis] = [primary]
    try:
        for server in (replica, *sentinels):
            server.start()
            started.append(server)
        # Ready when the replica is in sync and every Sentinel knows it and the other two
        # (they find each other through the primary's hello channel, every 2 s).
        deadline = time.monotonic() + 20
        while True:
            views = [_sentinel_view(s) for s in sentinels]
            linked = "master_link_status:up" in replica.cli("info", "replication")
            if linked and all(
                v.get("num-slaves") == "1" and v.get("num-other-sentinels") == "2" for v in views
            ):
                break
            assert time.monotonic() < deadline, f"sentinels did not settle: {views}"
            time.sleep(0.1)
        yield Cluster(primary, replica, sentinels)
    finally:
        for server in reversed(started):
            server.stop()


async def _watch_primary(sentinel: PrivateSentinel, first: int, into: dict[str, float]) -> None:
    """Records when this Sentinel first names a primary other than ``first``."""
    client = Redis(port=sentinel.port)
    try:
        while True:
            reply = await client.execute_command("SENTINEL", "get-master-addr-by-name", MASTER)
            if reply and int(reply[1]) != first:
                into["promoted_at"] = time.monotonic()
                return
            await asyncio.sleep(0.02)
    finally:
        await client.aclose()


async def test_services_carry_on_through_a_sentinel_failover(
    cluster: Cluster,
    spawn: Callable[..., ServiceProcess],
    token: Callable[..., str],
    make_settings: Callable[..., CommonSettings],
) -> None:
    # REDIS_URL names a port nothing listens on: only Sentinel can lead the services to Redis.
    env = {
        "REDIS_SENTINELS": cluster.sentinel_list,
        "REDIS_SENTINEL_MASTER": MASTER,
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    settings = make_settings(
        redis_url=env["REDIS_URL"],
        redis_sentinels=env["REDIS_SENTINELS"],
        redis_sentinel_master=MASTER,
    )
    policy = spawn("policy", **env)
    signaling = spawn("signaling", RING_TIMEOUT_S="30", CALLS_PER_MINUTE="1000", **env)
    redis = shared_redis.connect(settings, name="test-failover")
    http = httpx.AsyncClient(base_url=signaling.url, timeout=15)
    try:
        await prepare(policy.url, token, redis, settings, NODE, PAIRS)
        load = Load(http, token, ring_wait_s=RING_WAIT_S, pause_s=PAUSE_S)
        first = Attempt("caller0", "callee0", time.monotonic())
        await load.one_call(first)
        # Policy's verdict needs policy's Redis: a client of its own that went to REDIS_URL
        # instead of through the Sentinels would leave the call unrung here.
        assert (first.placed_status, first.rang) == (202, True), first
        workers = [asyncio.create_task(load.caller(i)) for i in range(PAIRS)]
        watch: dict[str, float] = {}
        probe = WriteProbe(cluster.primary.port, f"{settings.redis_prefix}:test:probe")
        # The probe writes from the start; the watcher waits for the promotion.
        watchers = [
            asyncio.create_task(probe.run()),
            asyncio.create_task(_watch_primary(cluster.sentinels[0], cluster.primary.port, watch)),
        ]
        try:
            await asyncio.sleep(BEFORE_KILL_S)
            cluster.primary.kill()
            killed_at = time.monotonic()

            def placing_again() -> bool:
                return _recovered_at(load.attempts, killed_at) is not None

            await eventually(placing_again, timeout=RECOVERY_BOUND_S, step=0.1)
            await asyncio.sleep(AFTER_RECOVERY_S)
        finally:
            load.stop.set()
            await asyncio.gather(*workers)
            for task in watchers:
                task.cancel()
            outcomes = await asyncio.gather(*watchers, return_exceptions=True)
        for outcome in outcomes:  # a probe or watcher that broke must say how
            if isinstance(outcome, Exception):
                raise outcome

        kept = int(await redis.get(probe.key) or 0)
        report = await _what_was_lost(
            http, token, load.attempts, killed_at, watch, (probe.acknowledged, kept)
        )
        print(report)

        # After the failover: both processes alive, ready, and a new call rings and ends.
        for proc in (policy, signaling):
            assert proc.proc is not None and proc.proc.poll() is None, f"{proc.service} died"
            async with httpx.AsyncClient(base_url=proc.url, timeout=5) as client:
                assert (await client.get("/readyz")).status_code == 200
        check = Attempt("caller0", "callee0", time.monotonic())
        await load.one_call(check)
        assert (check.placed_status, check.rang, check.hangup_status) == (202, True, 200), check

        # The harness's clean-up (tools.stack.remove_keys) finds the promoted primary
        # through the Sentinels too: REDIS_URL leads nowhere.
        marker = f"{settings.redis_prefix}:test:marker"
        keep = f"dmcall:other-{settings.namespace}:kept"
        await redis.set(marker, b"1", ex=60)
        await redis.set(keep, b"1", ex=60)
        await asyncio.to_thread(
            remove_keys,
            env["REDIS_URL"],
            settings.namespace,
            sentinels=env["REDIS_SENTINELS"],
            sentinel_master=MASTER,
        )
        assert await redis.exists(marker, probe.key) == 0  # (the services write on)
        assert await redis.get(keep) == b"1"  # another namespace's keys stay
        await redis.delete(keep)
    finally:
        await http.aclose()
        await redis.aclose()


def _failed_after(attempts: list[Attempt], killed_at: float) -> list[Attempt]:
    """Placements answered after the kill with anything but 202 (or no answer at all)."""
    return [a for a in attempts if a.placed_at >= killed_at and not a.placed]


def _recovered_at(attempts: list[Attempt], killed_at: float) -> float | None:
    """When the first call sent after the kill (and after the last failure) was placed."""
    failed = _failed_after(attempts, killed_at)
    since = max((a.placed_at for a in failed), default=killed_at)
    placed = [a.placed_at for a in attempts if a.placed and a.sent_at >= since]
    return min(placed, default=None)


@dataclass
class WriteProbe:
    """INCRs straight to the primary, one after another: the last one it acknowledged."""

    port: int
    key: str
    acknowledged: int = 0

    async def run(self) -> None:
        client = Redis(port=self.port, retry_on_error=[], socket_timeout=2)
        try:
            while True:
                self.acknowledged = int(await client.incr(self.key))
        except (OSError, ConnectionError, RedisError):
            return  # the primary is gone
        finally:
            await client.aclose(close_connection_pool=True)


async def _what_was_lost(
    http: httpx.AsyncClient,
    token: Callable[..., str],
    attempts: list[Attempt],
    killed_at: float,
    watch: dict[str, float],
    probe: tuple[int, int],
) -> str:
    """The figures: placing's outage, and what the acknowledged calls look like now."""
    outcomes: Counter[str] = Counter()
    lost: list[str] = []
    for a in attempts:
        if not a.placed or a.call_id is None:
            continue
        now = await http.get(f"/v1/calls/{a.call_id}", headers=auth(token(a.caller)))
        state = now.json()["state"] if now.status_code == 200 else f"http {now.status_code}"
        # What the users were told, against what the store says now.
        rang = "rang" if a.rang else "never rang"
        told = "cancelled" if a.hangup_status == 200 else f"cancel got {a.hangup_status}"
        when = "before the kill" if a.placed_at < killed_at else "after the kill"
        outcomes[f"placed {when}, {rang}, {told} -> now {state}"] += 1
        if now.status_code == 404:
            lost.append(f"{a.call_id} (placed {a.placed_at - killed_at:+.2f} s from the kill)")
    failed = _failed_after(attempts, killed_at)
    recovered = _recovered_at(attempts, killed_at)
    promoted = watch.get("promoted_at")
    before = sorted(a.placed_at - a.sent_at for a in attempts if a.placed_at < killed_at)
    slowest = max(attempts, key=lambda a: a.placed_at - a.sent_at)
    acknowledged, kept = probe
    lines = [
        "",
        f"Redis failover under load ({PAIRS} callers, each: place, wait for the ring, cancel, "
        f"pause {PAUSE_S} s):",
        f"  calls attempted {len(attempts)}, placed (202) {sum(a.placed for a in attempts)}; "
        f"placement p50 before the kill {before[len(before) // 2] * 1000:.0f} ms",
        "  Sentinel named the replica primary "
        + (f"{promoted - killed_at:.2f} s after the kill" if promoted else "(not seen)"),
        f"  placements answered after the kill but refused: {len(failed)} "
        + str(dict(Counter(str(a.placed_status or a.error) for a in failed))),
        "  last refusal "
        + (f"{max(a.placed_at for a in failed) - killed_at:.2f} s" if failed else "-")
        + " after the kill; placing works again (a call sent after the kill and the last "
        "refusal is placed) "
        + (f"{recovered - killed_at:.2f} s after the kill" if recovered else "never"),
        f"  slowest placement {slowest.placed_at - slowest.sent_at:.2f} s "
        f"(sent {slowest.sent_at - killed_at:+.2f} s from the kill)",
        f"  writes acknowledged by the old primary and missing on the new one: "
        f"{acknowledged - kept} of {acknowledged} (back-to-back INCRs)",
        f"  acknowledged calls the new primary does not know (404): {len(lost)}",
        *(f"    {line}" for line in lost),
        "  every placed call, what its users saw -> what the API says after the failover:",
        *(f"    {n:4d}  {what}" for what, n in sorted(outcomes.items())),
    ]
    return "\n".join(lines)


def test_sentinel_settings_are_parsed_and_a_half_configuration_is_refused() -> None:
    settings = CommonSettings(
        environment="test",
        redis_url="redis://:secret@ignored:1/3",
        redis_sentinels=" s1:26379, 10.0.0.2:26380 ,[::1]:26381",
        redis_sentinel_master=MASTER,
    )
    assert settings.redis_sentinel_addresses == [
        ("s1", 26379),
        ("10.0.0.2", 26380),
        ("::1", 26381),
    ]
    pool = shared_redis.connect(settings, name="t").connection_pool
    assert pool.connection_kwargs["db"] == 3 and pool.connection_kwargs["password"] == "secret"
    assert pool.service_name == MASTER and pool.timeout == shared_redis.POOL_WAIT_S  # type: ignore[attr-defined]
    assert CommonSettings(environment="test").redis_sentinel_addresses == []
    for bad, says in (
        ({"redis_sentinels": "s1:26379"}, "REDIS_SENTINEL_MASTER"),
        ({"redis_sentinels": "s1", "redis_sentinel_master": MASTER}, "not host:port"),
        (
            {
                "redis_sentinels": "s1:26379",
                "redis_sentinel_master": MASTER,
                "redis_url": "rediss://r:6379/0",
            },
            "redis:// URL",
        ),
    ):
        with pytest.raises(ValueError, match=says):
            CommonSettings(environment="test", **bad)


async def test_a_primary_refusing_writes_for_want_of_replicas_is_unavailable_not_a_bug(
    private_redis: PrivateRedis, make_settings: Callable[..., CommonSettings]
) -> None:
    """NOREPLICAS (``min-replicas-to-write`` with no replica in sync: just after a failover)
    is a backing service not answering: a 503 with Retry-After from every route, retried
    first, never a 500; a plain command and a script write alike; reads still answer."""
    settings = make_settings(CommonSettings, redis_url=private_redis.url)
    assert private_redis.cli("config", "set", "min-replicas-to-write", "1") == "OK"
    redis = shared_redis.connect(settings, name="test-noreplicas")

    async def write(request: Request) -> JSONResponse:
        await redis.set("dmcall:test:written", "1")
        return JSONResponse({"ok": True})

    app = create_service_app(
        service="test", settings=settings, routers=[APIRouter(routes=[Route("/w", write)])]
    )
    try:
        with pytest.raises(shared_redis.NoReplicasError):
            await redis.set("dmcall:test:k", "v")
        with pytest.raises(shared_redis.NoReplicasError):
            await redis.eval("return redis.call('SET', KEYS[1], 'v')", 1, "dmcall:test:k")
        assert await redis.get("dmcall:test:k") is None  # nothing was written; reads answer
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:
            answer = await client.get("/w")
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert answer.json()["error"] == "unavailable"
        # once a replica is in sync the same client writes again
        assert private_redis.cli("config", "set", "min-replicas-to-write", "0") == "OK"
        await redis.set("dmcall:test:k", "v")
        assert await redis.get("dmcall:test:k") == b"v"
    finally:
        await redis.aclose()
