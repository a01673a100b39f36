"""``make bench-policy``: how fast policy answers the permission query.

1. Spawns one policy process (its own namespace on the local RabbitMQ and Redis) and
   loads it with facts for ``--users`` callers and callees over the platform API.
2. Runs a separate load process: a minimal HTTP/1.1 client on uvloop with ``--connections``
   keep-alive connections, each sending ``GET /v1/permissions/{callee}`` back to back
   (a mix of allowed and denied pairs, one token per caller) for ``--seconds``, after a
   warm-up. Prints requests/s and p50/p90/p99/max latency, for each connection count.
3. In this process: decisions per second of the pure rule, and of the rule with its one
   Redis round trip (``PolicyStore.facts``) at a few concurrencies.

Figures depend on the machine; on a shared one they move with its other load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import redis as sync_redis
import uvloop

from shared.auth import issue_token
from shared.settings import CommonSettings
from tools import infra
from tools.procs import ROOT, ServiceProcess, free_port

# --------------------------------------------------------------------------- load process


async def _one_connection(
    host: str,
    port: int,
    requests: list[bytes],
    stop_at: float,
    record_after: float,
    latencies: list[float],
    errors: list[str],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    index = random.randrange(len(requests))
    clock = time.perf_counter
    try:
        while True:
            started = clock()
            if started >= stop_at:
                break
            writer.write(requests[index])
            index = (index + 1) % len(requests)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
                    break
            await reader.readexactly(length)
            ended = clock()
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append(head.split(b"\r\n", 1)[0].decode())
            elif started >= record_after:
                latencies.append(ended - started)
    finally:
        writer.close()


async def _load(args: argparse.Namespace) -> dict[str, Any]:
    pairs: list[list[str]] = json.loads(args.pairs)
    requests = [
        (
            f"GET /v1/permissions/{callee} HTTP/1.1\r\nHost: {args.host}\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
        for token, callee in pairs
    ]
    latencies: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    record_after = start + args.warmup
    stop_at = record_after + args.seconds
    await asyncio.gather(
        *(
            _one_connection(
                args.host, args.port, requests, stop_at, record_after, latencies, errors
            )
            for _ in range(args.connections)
        )
    )
    return _summary(latencies, args.seconds, errors)


def _summary(latencies: list[float], seconds: float, errors: list[str]) -> dict[str, Any]:
    latencies.sort()
    n = len(latencies)

    def pct(p: float) -> float:
        return latencies[min(n - 1, int(p * n))] * 1000 if n else float("nan")

    return {
        "requests": n,
        "rps": n / seconds,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": latencies[-1] * 1000 if n else float("nan"),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def load_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args(argv)
    args.pairs = sys.stdin.read()  # JSON [[token, callee], ...]
    print(json.dumps(uvloop.run(_load(args))), flush=True)


# --------------------------------------------------------------------------- set-up


def _facts(url: str, platform_token: str, users: int) -> list[tuple[str, str]]:
    """Callers u0..uN-1 and callees c0..cN-1: about half the pairs allowed, the rest
    denied by one rule or another. Returns the (caller, callee) pairs to query."""
    headers = {"Authorization": f"Bearer {platform_token}"}
    pairs: list[tuple[str, str]] = []
    with httpx.Client(base_url=url, headers=headers, timeout=10) as http:
        for i in range(users):
            caller, callee = f"u{i}", f"c{i}"
            http.put(
                f"/v1/platform/users/{caller}", json={"premium": i % 8 != 0, "verified": False}
            )
            if i % 4 != 1:
                http.post("/v1/platform/dms", json={"sender": callee, "recipient": caller})
            if i % 2 == 0:
                http.put(f"/v1/platform/users/{callee}/following/{caller}")
            pairs.append((caller, callee))
            pairs.append((caller, f"c{(i + 1) % users}"))
    return pairs


def _run_load(
    port: int, pairs: list[list[str]], connections: int, seconds: float
) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.bench_policy",
            "load",
            "--port",
            str(port),
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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), so the cost per request can be
    told apart from the time it waited for a core on a busy machine."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- profile


def _profile(proc: ServiceProcess, pairs: list[list[str]], seconds: float, path: str) -> None:
    """py-spy the server under load; print the share of samples under each frame of note."""
    assert proc.proc is not None
    venv_spy = Path(sys.executable).parent / "py-spy"
    py_spy = str(venv_spy) if venv_spy.exists() else shutil.which("py-spy")
    if py_spy is None:
        print("\n--profile needs py-spy: .venv/bin/pip install py-spy==0.4.3")
        return
    spy = subprocess.Popen(
        [py_spy, "record", "-p", str(proc.proc.pid), "-d", str(int(seconds) + 1),
         "-r", "250", "-f", "raw", "-o", path, "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.5)
    _run_load(proc.port, pairs, 8, seconds)
    spy.wait(30)
    totals: dict[str, int] = {}
    all_samples = 0
    with open(path) as stacks:
        for line in stacks:
            frames, _, count = line.rstrip().rpartition(" ")
            n = int(count)
            all_samples += n
            seen: set[str] = set()
            for frame in frames.split(";"):
                name = frame.split(" (")[0]
                where = frame.split(" (")[-1].split(":")[0].rstrip(")")
                key = f"{name} ({where.rsplit('/', 2)[-2] if '/' in where else where})"
                if key not in seen:
                    seen.add(key)
                    totals[key] = totals.get(key, 0) + n
    print(f"\npy-spy: {all_samples} samples of the policy process; inclusive share per frame")
    for key, n in sorted(totals.items(), key=lambda kv: -kv[1])[:45]:
        print(f"  {100 * n / all_samples:5.1f}%  {key}")


# --------------------------------------------------------------------------- main


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", default="1,4,8,16,32", help="comma-separated")
    parser.add_argument(
        "--profile",
        metavar="PATH",
        help="also sample the policy process with py-spy (pip install py-spy) during one "
        "extra 8-connection run; collapsed stacks to PATH, a summary printed",
    )
    args = parser.parse_args(argv)

    if not infra.ensure(quiet=True):
        sys.exit(1)
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    env = {
        "DMCALL_ENV": "test",
        "DMCALL_NAMESPACE": namespace,
        "BUS_QUEUE_EXPIRES_MS": "60000",
        "LOG_LEVEL": "WARNING",
    }
    os.environ.update({k: v for k, v in env.items() if k != "LOG_LEVEL"})
    settings = CommonSettings()
    log_path = ROOT / ".run" / "bench-policy.log"
    log_path.parent.mkdir(exist_ok=True)
    proc = ServiceProcess("policy", free_port(), env=env, log_path=log_path).start()
    try:
        proc.wait_ready()
        platform_token = issue_token(settings, "bench", scope="platform")
        pairs = _facts(proc.url, platform_token, args.users)
        tokens = {caller: issue_token(settings, caller) for caller, _ in pairs}
        wire_pairs = [[tokens[caller], callee] for caller, callee in pairs]

        print(f"policy permission query, one process ({os.cpu_count()} CPUs, shared machine)")
        print(f"{len(pairs)} distinct (caller, callee) pairs, {args.seconds:.0f}s per run\n")
        print("HTTP GET /v1/permissions/{callee}, keep-alive, separate load process")
        print(
            f"{'conns':>6} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}"
            f" {'server CPU/req':>15} {'load CPU/req':>13}"
        )
        assert proc.proc is not None
        for connections in (int(c) for c in args.connections.split(",")):
            cpu_before = _cpu_seconds(proc.proc.pid)
            load_before = _children_cpu_seconds()
            r = _run_load(proc.port, wire_pairs, connections, args.seconds)
            cpu = _cpu_seconds(proc.proc.pid) - cpu_before
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
            _profile(proc, wire_pairs, args.seconds, args.profile)

        print(
            "  server CPU/req: the policy process's CPU time (user + system) per request; "
            "1 s / it is what one core could serve; load CPU/req: the same for the load process"
        )
        print("\nin-process decisions per second")
        print(f"  pure rule (decide on Facts):        {_pure_decisions(2.0):>12,.0f}")
        for concurrency in (1, 16):
            rate = uvloop.run(_store_decisions(settings, pairs, concurrency, 3.0))
            print(f"  Redis facts + rule, {concurrency:>2} concurrent:   {rate:>12,.0f}")
    finally:
        proc.stop()
        client = sync_redis.Redis.from_url(settings.redis_url)
        keys = list(client.scan_iter(match=f"dmcall:{namespace}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        client.close()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "load":
        load_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
