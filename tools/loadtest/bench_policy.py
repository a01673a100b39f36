"""``make bench-policy``: how fast policy answers the permission query.

1. Spawns one policy process (its own namespace on the local RabbitMQ and Redis) and
   loads it with facts for ``--users`` callers and callees over the platform API.
2. Runs a separate load process: the harness's HTTP/1.1 client on uvloop with
   ``--connections`` keep-alive connections, each sending ``GET /v1/permissions/{callee}``
   back to back (a mix of allowed and denied pairs, one token per caller) for ``--seconds``, after a
   warm-up. Prints requests/s and p50/p90/p99/max latency, for each connection count.
3. In this process: the CPU time per query of the policy app alone (``--requests``
   sequential ``GET /v1/permissions/{callee}`` straight through its ASGI app: the whole
   stack of middlewares, routing, auth and Redis, no server, no client); decisions per
   second of the pure rule, and of the rule with its one Redis round trip
   (``PolicyStore.facts``) at a few concurrencies. ``--in-process`` runs only this part.

Figures depend on the machine; on a shared one they move with its other load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop

from shared.settings import DEV_JWT_SECRET, CommonSettings
from tools.loadtest.deployment import BASE_ENV, Deployment, process_stats, start_local
from tools.loadtest.http import HttpClient
from tools.loadtest.metrics import percentile
from tools.loadtest.population import Fact, set_up_facts
from tools.loadtest.profiling import Profiler, summary_lines
from tools.loadtest.tokens import TokenSource
from tools.stack import ROOT

# --------------------------------------------------------------------------- load process


async def _one_connection(
    url: str,
    pairs: list[list[str]],
    stop_at: float,
    record_after: float,
    latencies: list[float],
    errors: list[str],
) -> None:
    client = HttpClient(url, size=1)
    index = random.randrange(len(pairs))
    clock = time.perf_counter
    try:
        while True:
            started = clock()
            if started >= stop_at:
                break
            token, callee = pairs[index]
            index = (index + 1) % len(pairs)
            response = await client.request("GET", f"/v1/permissions/{callee}", token=token)
            ended = clock()
            if response.status != 200:
                errors.append(f"HTTP {response.status} {response.error_code}")
            elif started >= record_after:
                latencies.append(ended - started)
    finally:
        await client.close()


async def _load(args: argparse.Namespace) -> dict[str, Any]:
    pairs: list[list[str]] = json.loads(args.pairs)
    latencies: list[float] = []
    errors: list[str] = []
    record_after = time.perf_counter() + args.warmup
    stop_at = record_after + args.seconds
    await asyncio.gather(
        *(
            _one_connection(args.url, pairs, stop_at, record_after, latencies, errors)
            for _ in range(args.connections)
        )
    )
    ms = sorted(latency * 1000 for latency in latencies)
    return {
        "requests": len(ms),
        "rps": len(ms) / args.seconds,
        **{f"p{q}_ms": percentile(ms, q) for q in (50, 90, 99)},
        "max_ms": ms[-1] if ms else float("nan"),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def load_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args(argv)
    args.pairs = sys.stdin.read()  # JSON [[token, callee], ...]
    print(json.dumps(uvloop.run(_load(args))), flush=True)


# --------------------------------------------------------------------------- set-up


async def _facts(url: str, tokens: TokenSource, users: int) -> list[tuple[str, str]]:
    """Callers u0..uN-1 and callees c0..cN-1: about half the pairs allowed, the rest
    denied by one rule or another. Returns the (caller, callee) pairs to query."""
    facts: list[Fact] = []
    pairs: list[tuple[str, str]] = []
    for i in range(users):
        caller, callee = f"u{i}", f"c{i}"
        facts.append(
            ("PUT", f"/v1/platform/users/{caller}", {"premium": i % 8 != 0, "verified": False})
        )
        if i % 4 != 1:
            facts.append(("POST", "/v1/platform/dms", {"sender": callee, "recipient": caller}))
        if i % 2 == 0:
            facts.append(("PUT", f"/v1/platform/users/{callee}/following/{caller}", None))
        pairs.append((caller, callee))
        pairs.append((caller, f"c{(i + 1) % users}"))
    policy = HttpClient(url)
    await set_up_facts(facts, policy, tokens, concurrency=16)
    await policy.close()
    return pairs


def _run_load(url: str, pairs: list[list[str]], connections: int, seconds: float) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.loadtest.bench_policy",
            "load",
            "--url",
            url,
            "--connections",
            str(connections),
            "--seconds",
            str(seconds),
        ],
        input=json.dumps(pairs),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------- in-process


def _pure_decisions(seconds: float) -> float:
    from services.policy.domain import CallSettings, Facts, decide

    facts = [
        Facts(caller="a", callee="b", caller_premium=True, callee_messaged_caller=True,
              callee_follows_caller=True),
        Facts(caller="a", callee="b", caller_premium=True, callee_messaged_caller=True,
              callee_settings=CallSettings(allow_verified=True), caller_verified=True),
        Facts(caller="a", callee="b", caller_premium=False),
        Facts(caller="a", callee="b", caller_premium=True, callee_messaged_caller=True,
              callee_blocked_caller=True),
    ]  # fmt: skip
    done = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(2500):
            for f in facts:
                decide(f)
        done += 10_000
    return done / seconds


async def _store_decisions(
    settings: CommonSettings, pairs: list[tuple[str, str]], concurrency: int, seconds: float
) -> float:
    from services.policy.domain import decide
    from services.policy.store import PolicyStore
    from shared import redis as shared_redis

    redis = shared_redis.connect(settings, name="bench-policy")
    store = PolicyStore(redis, settings)
    count = 0
    deadline = time.perf_counter() + seconds

    async def worker(offset: int) -> None:
        nonlocal count
        i = offset
        while time.perf_counter() < deadline:
            caller, callee = pairs[i % len(pairs)]
            decide(await store.facts(caller, callee))
            count += 1
            i += 1

    await asyncio.gather(*(worker(k * 7) for k in range(concurrency)))
    await redis.aclose()
    return count / seconds


async def _app_cpu_per_query(
    settings: CommonSettings, pairs: list[list[str]], requests: int
) -> tuple[float, float]:
    """µs of this process's CPU per permission query through the policy app's ASGI
    interface (its lifespan run, Redis and the broker real), after 200 to warm up: the
    best and the median of five batches (the best is the steadier on a busy machine)."""
    from services.policy.app import create_app
    from services.policy.settings import PolicySettings

    # the queues and log level of the spawned policy process (same namespace)
    app = create_app(
        PolicySettings(
            **settings.model_dump(include=_CLIENT_SETTINGS),
            bus_queue_expires_ms=int(BASE_ENV["BUS_QUEUE_EXPIRES_MS"]),
            log_level=BASE_ENV["LOG_LEVEL"],
        )
    )
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def query(token: str, callee: str) -> None:
        path = f"/v1/permissions/{callee}"
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"policy"), (b"authorization", f"Bearer {token}".encode())],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8002),
        }
        await app(scope, receive, send)

    async with app.router.lifespan_context(app):
        for i in range(200):
            await query(*pairs[i % len(pairs)])
        batches = []
        for _ in range(5):
            started = time.process_time()
            for i in range(requests // 5):
                await query(*pairs[i % len(pairs)])
            batches.append((time.process_time() - started) / (requests // 5) * 1e6)
    if set(statuses) != {200}:
        raise RuntimeError(f"permission queries answered {sorted(set(statuses))}")
    return min(batches), statistics.median(batches)


_CLIENT_SETTINGS = {"environment", "namespace", "rabbitmq_url", "redis_url"}


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _profile(deployment: Deployment, pairs: list[list[str]], seconds: float, out: Path) -> None:
    """py-spy the server during one extra 8-connection run; print where its time went."""
    profiler = Profiler(deployment, out, datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"))
    profiler.start(seconds + 1)
    time.sleep(0.5)
    _run_load(deployment.policy_url, pairs, 8, seconds)
    print()
    for line in summary_lines(profiler.finish(), top=20):
        print(line)


# --------------------------------------------------------------------------- main


def _http_runs(
    deployment: Deployment, wire_pairs: list[list[str]], args: argparse.Namespace
) -> None:
    pid = deployment.pid("policy") or 0
    print("HTTP GET /v1/permissions/{callee}, keep-alive, separate load process")
    print(
        f"{'conns':>6} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}"
        f" {'server CPU/req':>15} {'load CPU/req':>13}"
    )
    for connections in (int(c) for c in args.connections.split(",")):
        cpu_before = process_stats(pid)["cpu_s"]
        load_before = _children_cpu_seconds()
        r = _run_load(deployment.policy_url, wire_pairs, connections, args.seconds)
        cpu = process_stats(pid)["cpu_s"] - cpu_before
        load_cpu = _children_cpu_seconds() - load_before
        # warm-up requests are not in r["requests"]; count them at the measured rate
        served = max(r["rps"] * (args.seconds + 1.0), 1)
        print(
            f"{connections:>6} {r['rps']:>9.0f} {r['p50_ms']:>8.2f} {r['p90_ms']:>8.2f} "
            f"{r['p99_ms']:>8.2f} {r['max_ms']:>8.2f} {cpu / served * 1e6:>12.0f} µs"
            f" {load_cpu / served * 1e6:>10.0f} µs"
            + (f"  errors={r['errors']} ({r['first_error']})" if r["errors"] else "")
        )

    if args.profile:
        _profile(deployment, wire_pairs, args.seconds, Path(args.profile))

    print(
        "  server CPU/req: the policy process's CPU time (user + system) per request; "
        "1 s / it is what one core could serve; load CPU/req: the same for the load process"
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", default="1,4,8,16,32", help="comma-separated")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="also sample the policy process with py-spy during one extra 8-connection run; "
        "collapsed stacks into DIR, a summary printed",
    )
    parser.add_argument("--requests", type=int, default=5000, help="of the in-process run")
    parser.add_argument(
        "--in-process", action="store_true", help="only the in-process figures, no HTTP runs"
    )
    args = parser.parse_args(argv)

    deployment = start_local(Path(tempfile.mkdtemp(prefix="bench-policy-")), ("policy",))
    settings = deployment.settings()
    tokens = TokenSource.from_secret(DEV_JWT_SECRET)
    try:
        pairs = uvloop.run(_facts(deployment.policy_url, tokens, args.users))
        wire_pairs = [[tokens.user(caller), callee] for caller, callee in pairs]

        print(f"policy permission query, one process ({os.cpu_count()} CPUs, shared machine)")
        print(f"{len(pairs)} distinct (caller, callee) pairs, {args.seconds:.0f}s per run\n")
        if not args.in_process:
            _http_runs(deployment, wire_pairs, args)
        print("\nin-process")
        best, median = uvloop.run(_app_cpu_per_query(settings, wire_pairs, args.requests))
        print(
            f"  the app alone, {args.requests} sequential queries in 5 batches: "
            f"{best:.0f} µs CPU/query (best batch), {median:.0f} µs (median)"
        )
        print(f"  pure rule (decide on Facts):        {_pure_decisions(2.0):>12,.0f} decisions/s")
        for concurrency in (1, 16):
            rate = uvloop.run(_store_decisions(settings, pairs, concurrency, 3.0))
            print(
                f"  Redis facts + rule, {concurrency:>2} concurrent:   {rate:>12,.0f} decisions/s"
            )
    finally:
        deployment.stop()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "load":
        load_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
