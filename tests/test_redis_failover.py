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
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from shared import redis as shared_redis
from shared.media_registry import MediaNode, MediaRegistry
from shared.settings import CommonSettings
from tests.conftest import auth
from tests.support.redis_server import PrivateRedis, PrivateSentinel
from tests.support.signaling import allow_call
from tests.support.waiting import eventually
from tools.procs import ServiceProcess, free_port

pytestmark = pytest.mark.e2e

MASTER = "dmcall"
PAIRS = 16  # callers, each calling its own callee: no rate limit, no busy callee
PAUSE_S = 0.25  # between one caller's calls: ~40 calls/s in all
BEFORE_KILL_S = 4.0
AFTER_RECOVERY_S = 4.0
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


@dataclass
class Attempt:
    """One call placed by one caller, and what the API told the users about it."""

    caller: str
    callee: str
    sent_at: float
    placed_status: int | None = None  # None: the request itself failed
    call_id: str | None = None
    rang: bool = False
    cancel_status: int | None = None
    error: str = ""


@dataclass
class Load:
    signaling: httpx.AsyncClient
    token: Callable[..., str]
    attempts: list[Attempt] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def caller(self, index: int) -> None:
        caller, callee = f"caller{index}", f"callee{index}"
        while not self.stop.is_set():
            attempt = Attempt(caller, callee, time.monotonic())
            self.attempts.append(attempt)
            try:
                await self._one_call(attempt)
            except httpx.HTTPError as exc:
                attempt.error = type(exc).__name__
            await asyncio.sleep(PAUSE_S)

    async def _one_call(self, attempt: Attempt) -> None:
        placed = await self.signaling.post(
            "/v1/calls",
            json={"callee": attempt.callee, "media": "audio"},
            headers=auth(self.token(attempt.caller)),
        )
        attempt.placed_status = placed.status_code
        if placed.status_code != 202:
            return
        attempt.call_id = str(placed.json()["call_id"])
        # Policy's verdict makes it ring; then the caller gives up (a cancel).
        for _ in range(40):
            seen = await self.signaling.get(
                f"/v1/calls/{attempt.call_id}", headers=auth(self.token(attempt.caller))
            )
            if seen.status_code == 200 and seen.json()["state"] == "ringing":
                attempt.rang = True
                break
            await asyncio.sleep(0.05)
        cancelled = await self.signaling.post(
            f"/v1/calls/{attempt.call_id}/hangup", headers=auth(self.token(attempt.caller))
        )
        attempt.cancel_status = cancelled.status_code


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
        await MediaRegistry(redis, settings).heartbeat(NODE, ttl_s=600)
        async with httpx.AsyncClient(base_url=policy.url, timeout=15) as policy_http:
            platform = token("platform-svc", scope="platform")
            for i in range(PAIRS):
                await allow_call(policy_http, platform, f"caller{i}", f"callee{i}")

        load = Load(http, token)
        workers = [asyncio.create_task(load.caller(i)) for i in range(PAIRS)]
        watch: dict[str, float] = {}
        watcher: asyncio.Task[None] | None = None
        try:
            await asyncio.sleep(BEFORE_KILL_S)
            watcher = asyncio.create_task(
                _watch_primary(cluster.sentinels[0], cluster.primary.port, watch)
            )
            cluster.primary.kill()
            killed_at = time.monotonic()

            def placing_again() -> bool:
                failed = [a for a in load.attempts if a.sent_at > killed_at and not _placed(a)]
                later = failed[-1].sent_at if failed else killed_at
                return any(_placed(a) and a.sent_at > later for a in load.attempts)

            await eventually(placing_again, timeout=RECOVERY_BOUND_S, step=0.1)
            await asyncio.sleep(AFTER_RECOVERY_S)
        finally:
            load.stop.set()
            await asyncio.gather(*workers)
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)

        report = await _what_was_lost(http, token, load.attempts, killed_at, watch)
        print(report)

        # After the failover: both processes alive, ready, and a new call rings and ends.
        for proc in (policy, signaling):
            assert proc.proc is not None and proc.proc.poll() is None, f"{proc.service} died"
            async with httpx.AsyncClient(base_url=proc.url, timeout=5) as client:
                assert (await client.get("/readyz")).status_code == 200
        check = Attempt("caller0", "callee0", time.monotonic())
        await load._one_call(check)
        assert (check.placed_status, check.rang, check.cancel_status) == (202, True, 200), check
    finally:
        await http.aclose()
        await redis.aclose()


def _placed(attempt: Attempt) -> bool:
    return attempt.placed_status == 202


async def _what_was_lost(
    http: httpx.AsyncClient,
    token: Callable[..., str],
    attempts: list[Attempt],
    killed_at: float,
    watch: dict[str, float],
) -> str:
    """The figures: placing's outage, and what the acknowledged calls look like now."""
    after_kill = [a for a in attempts if a.sent_at >= killed_at]
    failed = [a for a in after_kill if not _placed(a)]
    outcomes: Counter[str] = Counter()
    lost: list[str] = []
    for a in attempts:
        if not _placed(a) or a.call_id is None:
            continue
        now = await http.get(f"/v1/calls/{a.call_id}", headers=auth(token(a.caller)))
        state = now.json()["state"] if now.status_code == 200 else f"http {now.status_code}"
        # What the users were told, against what the store says now.
        told = "cancelled" if a.cancel_status == 200 else f"cancel {a.cancel_status}"
        when = "before kill" if a.sent_at < killed_at else "after kill"
        outcomes[f"{when}: rang={a.rang} {told} -> now {state}"] += 1
        if now.status_code == 404:
            lost.append(f"{a.call_id} ({when}, {a.sent_at - killed_at:+.2f} s)")
    window = (
        f"{max(a.sent_at for a in failed) - min(a.sent_at for a in failed):.2f} s "
        f"(first failed request {min(a.sent_at for a in failed) - killed_at:+.2f} s after "
        f"the kill, last {max(a.sent_at for a in failed) - killed_at:+.2f} s)"
        if failed
        else "none"
    )
    promoted = watch.get("promoted_at")
    lines = [
        "",
        "Redis failover under load "
        f"({PAIRS} callers, one call each per {PAUSE_S} s plus its round trips):",
        f"  calls attempted {len(attempts)}, placed (202) {sum(map(_placed, attempts))}",
        "  Sentinel named the replica primary "
        + (f"{promoted - killed_at:.2f} s after the kill" if promoted else "(not seen)"),
        f"  placing failed for {window}",
        "  failed placements by answer: "
        + str(dict(Counter(str(a.placed_status or a.error) for a in failed))),
        f"  acknowledged calls the promoted replica does not know (404): {len(lost)}",
        *(f"    {line}" for line in lost),
        "  every placed call, what its users saw -> what the API says now:",
        *(f"    {n:4d}  {what}" for what, n in sorted(outcomes.items())),
    ]
    return "\n".join(lines)
