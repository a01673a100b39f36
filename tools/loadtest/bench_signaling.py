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

The harness's own client (devices, HTTP, facts) and figures. Options: ``--pairs 40
--ring-timeout 2``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from shared import redis as shared_redis
from shared.media_registry import MediaNode, MediaRegistry
from shared.settings import DEV_JWT_SECRET
from tools.loadtest.deployment import start_local
from tools.loadtest.devices import Predicate, Received, Router, incoming_for, state_for
from tools.loadtest.http import HttpClient
from tools.loadtest.metrics import latency_line
from tools.loadtest.population import Group, Population, User, bounded, connected_pairs
from tools.loadtest.scenarios import parse_time
from tools.loadtest.tokens import TokenSource


async def run(pairs: int, ring_timeout: float) -> None:
    deployment = start_local(
        Path(tempfile.mkdtemp(prefix="bench-signaling-")),
        ("policy", "signaling", "signaling"),
        env={"RING_TIMEOUT_S": str(ring_timeout), "CALLS_PER_MINUTE": "100000"},
    )
    settings = deployment.settings()
    redis = shared_redis.connect(settings, name="bench-signaling")
    tokens = TokenSource.from_secret(DEV_JWT_SECRET)
    router = Router()
    s0, s1 = deployment.urls("signaling")
    h0, h1 = HttpClient(s0), HttpClient(s1)
    policy = HttpClient(deployment.policy_url)
    population: Population | None = None
    try:
        await MediaRegistry(redis, settings).heartbeat(
            MediaNode("bench-node", "http://127.0.0.1:9/", capacity=100_000, load=0), ttl_s=600
        )
        # the caller's socket on one instance, the callee's on the other
        ws = ("ws" + s0.removeprefix("http"), "ws" + s1.removeprefix("http"))
        population = await connected_pairs(
            "bench", pairs, policy, tokens, router, ws, concurrency=16
        )
        groups = population.groups

        async def wait(call_id: str, predicate: Predicate, within: float) -> Received:
            got = await router.track(call_id).wait(predicate, within)
            if got is None:
                raise RuntimeError(f"call {call_id}: nothing expected within {within:g} s")
            return got

        async def place(caller: User, callee: User, media: str) -> str:
            response = await h0.request(
                "POST",
                "/v1/calls",
                token=caller.token,
                json_body={"callee": callee.id, "media": media},
            )
            if response.status != 202:
                raise RuntimeError(f"placing a call: {response.status} {response.body!r}")
            return str(response.json()["call_id"])

        place_ms: list[float] = []
        accept_ms: list[float] = []

        async def answered(group: Group) -> None:
            caller, callee = group.users
            started = time.monotonic()
            call_id = await place(caller, callee, "audio")
            rang = await wait(call_id, incoming_for(callee.id), 30)
            place_ms.append((rang.at - started) * 1000)
            started = time.monotonic()
            await h1.request(
                "POST",
                f"/v1/calls/{call_id}/accept",
                token=callee.token,
                json_body={"device_id": callee.devices[0].device_id},
            )
            told = await wait(call_id, state_for(caller.id, "accepted"), 30)
            accept_ms.append((told.at - started) * 1000)
            await h0.request(
                "POST", f"/v1/calls/{call_id}/hangup", token=caller.token, json_body={}
            )

        await answered(groups[0])  # warm-up: connections, scripts, queues; not counted
        place_ms.clear()
        accept_ms.clear()
        await asyncio.gather(*(answered(g) for g in groups))

        async def missed(group: Group) -> tuple[float, float]:
            caller, callee = group.users
            call_id = await place(caller, callee, "video")
            seen = await wait(call_id, state_for(caller.id, "missed"), ring_timeout + 30)
            deadline = parse_time(seen.message["ring_deadline"]) or 0.0
            ended = parse_time(seen.message["ended_at"]) or 0.0
            return (ended - deadline) * 1000, (seen.wall - deadline) * 1000

        results = await asyncio.gather(*(missed(g) for g in groups))
        print(
            f"signaling, 2 instances + policy, {pairs} pairs, RING_TIMEOUT_S={ring_timeout} "
            "(shared, busy machine)"
        )
        for name, values in (
            ("place -> callee rings", place_ms),
            ("accept -> caller told", accept_ms),
            ("missed: server lateness", [r[0] for r in results]),
            ("missed: caller device told", [r[1] for r in results]),
        ):
            print(latency_line(name, values, (50, 95, 99)))
        for proc, client in zip(deployment.processes, (policy, h0, h1), strict=True):
            text = (await client.request("GET", "/metrics")).body.decode()
            for line in text.splitlines():
                if line.startswith("dmcall_bus_handler_duration_seconds_") and (
                    "_sum" in line or "_count" in line
                ):
                    print(f"  {proc.service}:{proc.port} {line}")
    finally:
        if population is not None:
            await bounded([d.close for d in population.devices], 64)
        for client in (h0, h1, policy):
            await client.close()
        await redis.aclose()
        deployment.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--ring-timeout", type=float, default=2.0)
    args = parser.parse_args()
    asyncio.run(run(args.pairs, args.ring_timeout))


if __name__ == "__main__":
    main()
