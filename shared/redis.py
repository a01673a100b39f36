"""Redis: the client every service uses, and how keys are named.

Redis is the store of record for settings, facts, calls, history and inboxes (see
docs/operations.md for the persistence production needs). Every key starts with the
deployment's prefix (``dmcall`` or ``dmcall:<namespace>``), then the owning service,
then the key's own parts: ``dmcall:policy:settings:alice``. Each store module defines
its key shapes as functions next to a comment saying what the key holds.
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.settings import CommonSettings

POOL_WAIT_S = 5.0


def connect(settings: CommonSettings, *, name: str) -> Redis:
    """A pooled client that reconnects by itself: a Redis restart costs retries, not a restart.

    Nothing is connected until the first command, so a service starts while Redis is down
    and reports not-ready until it answers.

    The pool *waits* (up to ``POOL_WAIT_S``) for a free connection when all are in use:
    under overload a command queues a little longer instead of failing at once with
    ``MaxConnectionsError`` (which turned into 500s and failed ring-timer passes).
    """
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        timeout=POOL_WAIT_S,
        decode_responses=False,
        client_name=name,
        socket_connect_timeout=2.0,
        socket_timeout=5.0,
        health_check_interval=15,
        retry=Retry(EqualJitterBackoff(cap=1.0, base=0.05), retries=5),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionResetError],
        max_connections=256,
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


class KeySpace:
    """Builds the keys of one owner (a service or a shared mechanism)."""

    __slots__ = ("prefix",)

    def __init__(self, settings: CommonSettings, owner: str) -> None:
        self.prefix = f"{settings.redis_prefix}:{owner}"

    def __call__(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))
