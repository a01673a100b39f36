"""``make bench-signaling``: figures for the signaling service, printed, never asserted.

Starts the real policy service and two signaling instances on free ports (a fresh
namespace on the local RabbitMQ and Redis), lets N caller/callee pairs call each other with
the callee's socket on the other instance, and prints percentiles of:

- place -> ring: ``POST /v1/calls`` until the callee's device has ``call.incoming``
  (through policy and back over the broker);
- accept -> caller told: ``POST .../accept`` until the caller's device has ``call.state``
  accepted (cross-instance push);
- missed lateness: the server's ``ended_at - ring_deadline`` of calls nobody answered,
  and the same seen by the caller's device (deadline until ``call.state`` missed arrives).

Options: ``--pairs 40 --ring-timeout 2``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import redis as sync_redis
from redis.asyncio import Redis

from shared.auth import issue_token
from shared.media_registry import MediaNode, MediaRegistry
from shared.settings import CommonSettings
from tests.support.signaling import Device, allow_call
from tools import infra
from tools.procs import ServiceProcess, free_port


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _report(name: str, values_ms: list[float]) -> None:
    if not values_ms:
        print(f"{name}: no samples")
        return
    print(
        f"{name:<34} n={len(values_ms):<4} p50={_pct(values_ms, 50):7.1f} ms "
        f"p95={_pct(values_ms, 95):7.1f} ms p99={_pct(values_ms, 99):7.1f} ms "
        f"max={max(values_ms):7.1f} ms mean={statistics.fmean(values_ms):7.1f} ms"
    )


async def run(pairs: int, ring_timeout: float) -> None:
    if not infra.ensure(quiet=True):
        raise SystemExit("RabbitMQ and Redis must answer (see tools/infra.py)")
    rabbit = os.environ.get("RABBITMQ_URL", infra.DEFAULT_RABBITMQ_URL)
    redis_url = os.environ.get("REDIS_URL", infra.DEFAULT_REDIS_URL)
    namespace = f"bench{uuid.uuid4().hex[:10]}"
    settings = CommonSettings(
        environment="test", namespace=namespace, rabbitmq_url=rabbit, redis_url=redis_url
    )
    env = {
        "DMCALL_ENV": "test",
        "DMCALL_NAMESPACE": namespace,
        "RABBITMQ_URL": rabbit,
        "REDIS_URL": redis_url,
        "BUS_QUEUE_EXPIRES_MS": "600000",
        "RING_TIMEOUT_S": str(ring_timeout),
        "CALLS_PER_MINUTE": "100000",
        "LOG_LEVEL": "WARNING",
    }
    logs = Path(tempfile.mkdtemp(prefix="bench-signaling-"))
    procs = [ServiceProcess("policy", free_port(), env=env, log_path=logs / "policy.log")]
    for index in range(2):
        procs.append(
            ServiceProcess(
                "signaling",
                free_port(),
                env={**env, "DMCALL_INSTANCE_ID": f"bench-signaling-{index}"},
                log_path=logs / f"signaling-{index}.log",
            )
        )
    redis = Redis.from_url(redis_url)
    devices: list[Device] = []
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.wait_ready()
        policy, s0, s1 = procs
        await MediaRegistry(redis, settings).heartbeat(
            MediaNode("bench-node", "http://127.0.0.1:9/", capacity=100_000, load=0), ttl_s=600
        )

        def tok(user: str) -> str:
            return issue_token(settings, user)

        platform = issue_token(settings, "platform-svc", scope="platform")
        async with httpx.AsyncClient(base_url=policy.url, timeout=30) as client:
            for i in range(pairs):
                await allow_call(client, platform, f"caller{i}", f"callee{i}")
        callers = [await Device.connect(s0.url, tok(f"caller{i}"), "", "c") for i in range(pairs)]
        callees = [await Device.connect(s1.url, tok(f"callee{i}"), "", "d") for i in range(pairs)]
        devices = callers + callees

        place_ms: list[float] = []
        accept_ms: list[float] = []
        async with (
            httpx.AsyncClient(base_url=s0.url, timeout=30) as h0,
            httpx.AsyncClient(base_url=s1.url, timeout=30) as h1,
        ):

            async def answered(i: int) -> None:
                started = time.perf_counter()
                placed = await h0.post(
                    "/v1/calls",
                    json={"callee": f"callee{i}", "media": "audio"},
                    headers={"Authorization": f"Bearer {tok(f'caller{i}')}"},
                )
                call_id = placed.json()["call_id"]
                await callees[i].expect(timeout=30, type="call.incoming", call_id=call_id)
                place_ms.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                await h1.post(
                    f"/v1/calls/{call_id}/accept",
                    json={"device_id": "d"},
                    headers={"Authorization": f"Bearer {tok(f'callee{i}')}"},
                )
                await callers[i].expect(
                    timeout=30, type="call.state", call_id=call_id, state="accepted"
                )
                accept_ms.append((time.perf_counter() - started) * 1000)
                await h0.post(
                    f"/v1/calls/{call_id}/hangup",
                    headers={"Authorization": f"Bearer {tok(f'caller{i}')}"},
                )

            await answered(0)  # warm-up: connections, scripts, queues; not counted
            place_ms.clear()
            accept_ms.clear()
            await asyncio.gather(*(answered(i) for i in range(pairs)))

            async def missed(i: int) -> tuple[float, float]:
                placed = await h0.post(
                    "/v1/calls",
                    json={"callee": f"callee{i}", "media": "video"},
                    headers={"Authorization": f"Bearer {tok(f'caller{i}')}"},
                )
                call_id = placed.json()["call_id"]
                seen = await callers[i].expect(
                    timeout=ring_timeout + 30, type="call.state", call_id=call_id, state="missed"
                )
                arrived = time.time()
                deadline = datetime.fromisoformat(seen["ring_deadline"]).timestamp()
                ended = datetime.fromisoformat(seen["ended_at"]).timestamp()
                return (ended - deadline) * 1000, (arrived - deadline) * 1000

            results = await asyncio.gather(*(missed(i) for i in range(pairs)))
        print(
            f"signaling, 2 instances + policy, {pairs} pairs, RING_TIMEOUT_S={ring_timeout} "
            "(shared, busy machine)"
        )
        _report("place -> callee rings", place_ms)
        _report("accept -> caller told", accept_ms)
        _report("missed: server lateness", [r[0] for r in results])
        _report("missed: caller device told", [r[1] for r in results])
        async with httpx.AsyncClient(timeout=10) as plain:
            metrics = [(p, (await plain.get(f"{p.url}/metrics")).text) for p in procs]
        for proc, text in metrics:
            for line in text.splitlines():
                if line.startswith("dmcall_bus_handler_duration_seconds_") and (
                    "_sum" in line or "_count" in line
                ):
                    print(f"  {proc.service}:{proc.port} {line}")
    finally:
        for device in devices:
            await device.close()
        for proc in procs:
            proc.stop()
        await redis.aclose()
        client_sync = sync_redis.Redis.from_url(redis_url)
        keys = list(client_sync.scan_iter(match=f"dmcall:{namespace}:*", count=1000))
        for start in range(0, len(keys), 500):
            client_sync.delete(*keys[start : start + 500])
        client_sync.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--ring-timeout", type=float, default=2.0)
    args = parser.parse_args()
    asyncio.run(run(args.pairs, args.ring_timeout))


if __name__ == "__main__":
    main()
