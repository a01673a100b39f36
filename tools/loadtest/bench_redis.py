"""``make bench-redis``: what one Redis command costs the client, per pool.

Every service's Redis traffic goes through one pool (shared/redis.py). This compares
redis-py's own ``BlockingConnectionPool`` with dmcall's ``LeanBlockingPool`` on the same
client settings, alternating rounds of ``--commands`` ``GET``s from ``--tasks`` concurrent
tasks on uvloop, against the local Redis. Per pool it prints the client's CPU time per
command (median of the rounds; this machine's timings move ±20% between runs, so the
rounds alternate) and the Python function calls per command, which do not move.

For an exact count, the CPU instructions per command under callgrind (repeatable to 0.1%):

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python -m tools.loadtest.bench_redis --only lean --commands 4000 --rounds 1

minus the same with ``--commands 0``, over 4000.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import time
from typing import Any

import uvloop
from redis.asyncio import BlockingConnectionPool, Redis

from shared import redis as shared_redis
from shared.settings import CommonSettings

POOLS: dict[str, type[BlockingConnectionPool]] = {
    "redis-py": BlockingConnectionPool,
    "lean": shared_redis.LeanBlockingPool,
}


def client(kind: str, settings: CommonSettings) -> Redis:
    """A client with the services' options (shared.redis.connect) over the ``kind`` pool."""
    options = shared_redis.client_options("bench-redis")
    return Redis.from_pool(POOLS[kind].from_url(settings.redis_url, **options))


async def _round(redis: Redis, key: str, commands: int, tasks: int) -> None:
    async def worker(n: int) -> None:
        for _ in range(n):
            await redis.get(key)

    share, rest = divmod(commands, tasks)
    await asyncio.gather(*(worker(share + (i < rest)) for i in range(tasks)))


def _python_calls(stats: cProfile.Profile) -> int:
    return sum(row[1] for row in pstats.Stats(stats).stats.values())  # type: ignore[attr-defined]


async def bench(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    settings = CommonSettings()
    kinds = [args.only] if args.only else list(POOLS)
    clients = {kind: client(kind, settings) for kind in kinds}
    key = f"{settings.redis_prefix}:bench-redis:key"
    cpu: dict[str, list[float]] = {kind: [] for kind in kinds}
    calls: dict[str, float] = {}
    try:
        for kind, redis in clients.items():  # connect, warm up, count the calls
            await redis.set(key, b"v", ex=600)
            await _round(redis, key, 200, args.tasks)
            if args.commands and not args.only:  # --only is for callgrind: nothing else
                profile = cProfile.Profile()
                profile.enable()
                await _round(redis, key, 1000, args.tasks)
                profile.disable()
                calls[kind] = _python_calls(profile) / 1000
        for _ in range(args.rounds):
            for kind, redis in clients.items():
                started = time.process_time()
                await _round(redis, key, args.commands, args.tasks)
                if args.commands:
                    cpu[kind].append((time.process_time() - started) / args.commands * 1e6)
    finally:
        for redis in clients.values():
            await redis.delete(key)
            await redis.aclose()
    return {
        kind: {
            "cpu_us_per_command": statistics.median(cpu[kind]) if cpu[kind] else 0.0,
            "python_calls_per_command": calls.get(kind, 0.0),
        }
        for kind in kinds
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--commands", type=int, default=20_000, help="GETs per round and pool")
    parser.add_argument("--tasks", type=int, default=4, help="concurrent tasks issuing them")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per pool")
    parser.add_argument(
        "--only", choices=list(POOLS), help="one pool, no call count (for callgrind)"
    )
    args = parser.parse_args(argv)
    figures: dict[str, Any] = uvloop.run(bench(args))
    print(f"{args.commands} GETs x {args.rounds} rounds, {args.tasks} tasks, alternating")
    base = figures.get("redis-py")
    for kind, row in figures.items():
        vs = ""
        if base and kind != "redis-py" and base["cpu_us_per_command"]:
            vs = f"  ({row['cpu_us_per_command'] / base['cpu_us_per_command'] - 1:+.0%} CPU)"
        print(
            f"  {kind:9} {row['cpu_us_per_command']:7.1f} µs CPU per command, "
            f"{row['python_calls_per_command']:6.1f} Python calls per command{vs}"
        )


if __name__ == "__main__":
    main()
