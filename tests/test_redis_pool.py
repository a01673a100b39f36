"""shared.redis.LeanBlockingPool: redis-py's blocking pool with a short way in and out.

Against the real Redis: the internals it reads exist on this redis-py, it wakes a task
waiting for a connection, it never opens more than its limit, it reconnects a dropped
connection, it disconnects one marked for reconnect, and in maintenance it takes
redis-py's own path.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import BlockingConnectionPool, Redis

from shared import redis as shared_redis
from shared.settings import CommonSettings


def _pool(settings: CommonSettings, **overrides: Any) -> shared_redis.LeanBlockingPool:
    options = {**shared_redis.client_options(f"pool-test-{uuid.uuid4().hex[:8]}"), **overrides}
    return shared_redis.LeanBlockingPool.from_url(settings.redis_url, **options)


@pytest.fixture
async def lean(settings: CommonSettings) -> AsyncIterator[Redis]:
    client = Redis.from_pool(_pool(settings, max_connections=2, timeout=3.0))
    yield client
    await client.aclose()


def test_the_internals_the_pool_reads_exist_on_this_redis_py(settings: CommonSettings) -> None:
    pool = BlockingConnectionPool.from_url(settings.redis_url)
    assert isinstance(pool._available_connections, list)
    assert hasattr(pool._in_use_connections, "add")
    assert hasattr(pool._in_use_connections, "remove")
    assert pool._in_maintenance is False
    assert isinstance(pool._condition, asyncio.Condition)
    assert len(pool._condition._waiters) == 0  # type: ignore[attr-defined]
    connection = pool.make_connection()
    assert connection.should_reconnect() is False
    assert callable(pool.ensure_connection)


def test_the_services_connect_through_it(settings: CommonSettings) -> None:
    client = shared_redis.connect(settings, name="pool-test")
    assert isinstance(client.connection_pool, shared_redis.LeanBlockingPool)


async def test_tasks_waiting_for_a_connection_are_woken_and_the_limit_holds(
    lean: Redis, settings: CommonSettings
) -> None:
    pool = lean.connection_pool
    key = f"{settings.redis_prefix}:pool-test:{uuid.uuid4().hex}"
    # 12 blocking pops of 50 ms over 2 connections: 10 tasks wait for a connection, and
    # each is woken by a release (without the wake-up they wait out the 3 s and fail)
    results = await asyncio.gather(*(lean.blpop([key], timeout=0.05) for _ in range(12)))
    assert results == [None] * 12
    assert len(pool._in_use_connections) == 0
    assert len(pool._available_connections) == 2
    assert len(pool._condition._waiters) == 0  # type: ignore[attr-defined]
    # and the short way serves many commands from the same two connections
    await asyncio.gather(*(lean.incr(key) for _ in range(200)))
    assert int(await lean.get(key)) == 200
    assert len(pool._available_connections) == 2
    await lean.delete(key)


async def test_a_connection_killed_by_the_server_is_replaced(
    lean: Redis, redis_client: Redis
) -> None:
    name = lean.connection_pool.connection_kwargs["client_name"]
    assert await lean.ping()
    killed = await redis_client.execute_command(
        "CLIENT", "KILL", "SKIPME", "yes", "ID", await lean.client_id()
    )
    assert killed == 1
    # the free connection is dead: the pool's check (or the retry) reconnects it
    assert await lean.ping()
    clients = await redis_client.client_list()
    assert sum(1 for c in clients if c["name"] == name) == 1


async def test_a_connection_marked_for_reconnect_is_disconnected_on_release(lean: Redis) -> None:
    pool = lean.connection_pool
    connection = await pool.get_connection()
    await connection.send_command("PING")
    assert await connection.read_response() == b"PONG"
    assert connection.is_connected
    connection.mark_for_reconnect()
    await pool.release(connection)
    assert not connection.is_connected
    assert pool._available_connections == [connection]
    assert await lean.ping()  # and it connects again when next taken


async def test_the_short_way_is_taken_unless_in_maintenance(lean: Redis) -> None:
    pool = lean.connection_pool
    assert await lean.ping()  # one free connection
    calls: list[str] = []
    base_get = BlockingConnectionPool.get_connection
    base_release = BlockingConnectionPool.release

    async def get(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append("get")
        return await base_get(self, *args, **kwargs)

    async def release(self: Any, connection: Any) -> None:
        calls.append("release")
        await base_release(self, connection)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BlockingConnectionPool, "get_connection", get)
        patch.setattr(BlockingConnectionPool, "release", release)
        assert await lean.ping()
        assert calls == []  # a free connection, nobody waiting: redis-py's path unused
        pool.set_in_maintenance(True)
        try:
            assert await lean.ping()
        finally:
            pool.set_in_maintenance(False)
        assert calls == ["get", "release"]
    assert len(pool._in_use_connections) == 0


async def test_a_cancelled_command_is_never_carried_on(settings: CommonSettings) -> None:
    """Python 3.11's ``asyncio.wait_for`` (redis-py's bound on each write) returns instead
    of raising when the cancel comes as the write completes, and the cancelled task goes
    on: a background loop told to stop never does. The services' connections write under
    ``asyncio.timeout``. Cancels are sent 0 to 7 loop turns into a write, 20 times each
    (redis-py's own connection lost 40 to 63 of these 160 in a scratch run)."""
    client = shared_redis.connect(settings, name="pool-test-cancel")
    connection = await client.connection_pool.get_connection()
    carried_on = 0
    cancelled = 0
    try:
        for turns in range(8):
            for _ in range(20):

                async def one_write() -> str:
                    await connection.send_packed_command(connection.pack_command("PING"))
                    return "carried on"

                task = asyncio.ensure_future(one_write())
                for _ in range(turns):
                    await asyncio.sleep(0)
                if task.cancel():
                    cancelled += 1
                    (outcome,) = await asyncio.gather(task, return_exceptions=True)
                    carried_on += outcome == "carried on"
                else:
                    await task
                # a write cut short disconnects; drain the PONGs of those that went out
                if connection.is_connected:
                    with contextlib.suppress(TimeoutError):
                        while True:
                            async with asyncio.timeout(0.05):
                                await connection.read_response()
    finally:
        await client.connection_pool.release(connection)
        await client.aclose()
    assert cancelled > 100  # the cancels did land mid-write
    assert carried_on == 0
