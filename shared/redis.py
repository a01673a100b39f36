"""Redis: the client every service uses, how keys are named, and the helpers stores share.

Redis is the store of record for settings, facts, calls, history and inboxes (see
docs/operations.md for the persistence production needs). Every key starts with the
deployment's prefix (``dmcall`` or ``dmcall:<namespace>``), then the owning service,
then the key's own parts: ``dmcall:policy:settings:alice``. Each store module defines
its key shapes as functions next to a comment saying what the key holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from redis._parsers.base import BaseParser
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import EqualJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.settings import CommonSettings

POOL_WAIT_S = 5.0
SENTINEL_TIMEOUT_S = 1.0


class NoReplicasError(RedisConnectionError):
    """``NOREPLICAS``: the primary refuses writes (``min-replicas-to-write``) while no
    replica is in sync: right after a failover, during a resync, with every replica down.
    Nothing was written (Redis refuses a transaction or a script at its first write), so,
    like a dropped connection, it is retried with backoff, then answered ``503`` with
    ``Retry-After`` and requeued by the bus, never a 500 or a dead-lettered event.
    redis-py has no class of its own for it (a plain ``ResponseError``): :func:`connect`
    registers this one with its reply parser."""


def _classify_refusals() -> None:
    BaseParser.EXCEPTION_CLASSES.setdefault("NOREPLICAS", NoReplicasError)


def connect(settings: CommonSettings, *, name: str) -> Redis:
    """A pooled client that reconnects by itself: a Redis restart costs retries, not a restart.

    Nothing is connected until the first command, so a service starts while Redis is down
    and reports not-ready until it answers.

    The pool *waits* (up to ``POOL_WAIT_S``) for a free connection when all are in use:
    under overload a command queues a little longer instead of failing at once with
    ``MaxConnectionsError`` (which turned into 500s and failed ring-timer passes).

    With ``REDIS_SENTINELS`` set, every new connection asks the Sentinels where the primary
    is, so after a failover the retries land on the promoted replica: the service carries on
    without a restart (docs/operations.md, "Redis failover"). Otherwise ``REDIS_URL`` is the
    primary.
    """
    _classify_refusals()
    options = client_options(name)
    if settings.redis_sentinel_addresses:
        pool: BlockingConnectionPool = _sentinel_pool(settings, name, options)
    else:
        pool = LeanBlockingPool.from_url(settings.redis_url, **options)
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


def client_options(name: str) -> dict[str, Any]:
    """The pool and connection options of every service's client (:func:`connect`)."""
    return {
        "timeout": POOL_WAIT_S,
        "decode_responses": False,
        "client_name": name,
        "socket_connect_timeout": 2.0,
        "socket_timeout": 5.0,
        "health_check_interval": 15,
        "retry": Retry(EqualJitterBackoff(cap=1.0, base=0.05), retries=5),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError, ConnectionResetError],
        "max_connections": 256,
    }


class _CancellableWrites:
    """A connection whose command writes can be cancelled on Python 3.11.

    redis-py bounds each write with ``asyncio.wait_for``, which on Python 3.11 returns the
    result instead of raising when the task is cancelled just as the write completes
    (CPython gh-86296; 3.12 rewrote it on ``asyncio.timeout``): the cancelled task carries
    on, and a background loop told to stop never does. 40 to 63 of 160 cancellations were
    lost that way in a scratch run; a notifications instance that hung in shutdown until it
    was killed was one (2026-12-02). This is redis-py's own method with ``asyncio.timeout``
    instead; ``tests/test_redis_pool.py`` checks that no cancellation is lost."""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        conn: Any = self
        if not conn.is_connected:
            await conn.connect_check_health(check_health=False)
        if check_health:
            await conn.check_health()
        try:
            if isinstance(command, str):
                command = command.encode()
            if isinstance(command, bytes):
                command = [command]
            conn._writer.writelines(command)
            async with asyncio.timeout(conn.socket_timeout):
                await conn._writer.drain()
        except TimeoutError:
            await conn.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        except OSError as e:
            await conn.disconnect(nowait=True)
            if len(e.args) == 1:
                err_no, errmsg = "UNKNOWN", e.args[0]
            else:
                err_no, errmsg = e.args[0], e.args[1]
            raise RedisConnectionError(f"Error {err_no} while writing to socket. {errmsg}.") from e
        except BaseException:
            # as redis-py: a write cut short leaves the connection unusable
            await conn.disconnect(nowait=True)
            raise


_CANCELLABLE: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _with_cancellable_writes(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """``cls`` (plain, TLS, Unix socket or Sentinel-managed) with cancellable writes."""
    if issubclass(cls, _CancellableWrites):
        return cls
    made = _CANCELLABLE.get(cls)
    if made is None:
        made = _CANCELLABLE[cls] = type(f"Cancellable{cls.__name__}", (_CancellableWrites, cls), {})
    return made


class LeanBlockingPool(BlockingConnectionPool):
    """redis-py's blocking pool, with a short way in and out for the common case.

    redis-py 8's pool takes and gives back a connection under an ``asyncio.Condition``, a
    lock, an ``asyncio.timeout``, a re-authentication event and four observability
    records, on every command: 285,000 CPU instructions per ``GET`` of which this pool
    leaves 173,000 (``make bench-redis``, docs/performance.md). When a
    connection is free, nobody waits for one and the pool is not in maintenance, taking
    one is a ``pop`` and giving it back an ``append``, with the same connection check
    (``ensure_connection``) and the same reconnect-on-release; otherwise redis-py's own
    path runs, waits and wake-ups included. Nothing here needs the lock: under asyncio
    nothing runs between the check and the ``pop``. What it skips: redis-py's
    observability counters (dmcall does not turn them on) and the re-authentication
    event (only a streaming credential provider listens; dmcall has none).
    ``tests/test_redis_pool.py`` checks the internals it reads, and the pool's behaviour
    under contention, a dropped connection and maintenance.

    Its connections, whatever class the URL or Sentinel picks, write with
    :class:`_CancellableWrites`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connection_class = _with_cancellable_writes(self.connection_class)

    async def get_connection(  # type: ignore[override]
        self, command_name: Any = None, *keys: Any, **options: Any
    ) -> Any:
        available = self._available_connections
        if not available or self._in_maintenance:
            return await super().get_connection()
        connection = available.pop()
        self._in_use_connections.add(connection)
        try:
            await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def release(self, connection: Any) -> None:
        if self._in_maintenance or self._condition._waiters:  # type: ignore[attr-defined]
            await super().release(connection)  # wakes the one waiting
            return
        self._in_use_connections.remove(connection)
        if connection.should_reconnect():
            await connection.disconnect()
        self._available_connections.append(connection)


class _BlockingSentinelPool(SentinelConnectionPool, LeanBlockingPool):
    """Connections to whichever node the Sentinels name primary, with the blocking pool's
    wait for a free connection (redis-py's own Sentinel pool fails at once when full)."""

    sentinel_manager: Sentinel

    async def aclose(self) -> None:
        await super().aclose()
        await self.sentinel_manager.aclose()  # the pool is the only user of its Sentinel


def _sentinel_pool(
    settings: CommonSettings, name: str, options: dict[str, Any]
) -> _BlockingSentinelPool:
    primary = parse_url(settings.redis_url)  # host and port unused: Sentinel says where
    sentinel = Sentinel(
        settings.redis_sentinel_addresses,
        sentinel_kwargs={
            "username": settings.redis_sentinel_username,
            "password": settings.redis_sentinel_password,
            "client_name": f"{name}-sentinel",
            "socket_connect_timeout": SENTINEL_TIMEOUT_S,
            "socket_timeout": SENTINEL_TIMEOUT_S,
            # a dead Sentinel is skipped for the next one, not retried
            "retry": Retry(NoBackoff(), retries=0),
        },
    )
    return _BlockingSentinelPool(
        settings.redis_sentinel_master,
        sentinel,
        db=primary.get("db", 0),
        username=primary.get("username"),
        password=primary.get("password"),
        **options,
    )


# A dated fact "member is in the set" or "is not" (policy's relations, group membership),
# by the rule of every platform fact: one older than the last applied to the member is
# ignored, so reordered and redelivered facts end in the state of the newest; a remove and
# an add with the same time resolve to the remove, whichever arrives first.
# KEYS[1] the set, KEYS[2] its clock hash (member -> occurred_at µs of the last fact
# applied; kept after a removal), optional KEYS[3] the reverse set, where ARGV[4] is added
# or removed alike. ARGV: member, occurred_at µs, "1" add | "0" remove[, the reverse
# member] -> {applied 0|1, present 0|1}
MEMBERSHIP_FACT_LUA = """
local last = redis.call('HGET', KEYS[2], ARGV[1])
local at = tonumber(ARGV[2])
if last then
  last = tonumber(last)
  if at < last or (at == last and ARGV[3] == '1') then
    return {0, redis.call('SISMEMBER', KEYS[1], ARGV[1])}
  end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local change = ARGV[3] == '1' and 'SADD' or 'SREM'
redis.call(change, KEYS[1], ARGV[1])
if KEYS[3] then
  redis.call(change, KEYS[3], ARGV[4])
end
return {1, tonumber(ARGV[3])}
"""


class KeySpace:
    """Builds the keys of one owner (a service or a shared mechanism)."""

    __slots__ = ("prefix",)

    def __init__(self, settings: CommonSettings, owner: str) -> None:
        self.prefix = f"{settings.redis_prefix}:{owner}"

    def __call__(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))


async def hgetall_many(redis: Redis, keys: Iterable[str]) -> list[dict[bytes, bytes]]:
    """Each key's HGETALL (``{}`` for a missing key), in order, in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hgetall(key)
        return list(await pipe.execute())
