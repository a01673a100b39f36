"""PolicyStore against a real Redis: the permission query gives each of many concurrent
queries its own answer, reads the URL's database, reloads a script Redis lost, and
reconnects after a Redis restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest

from services.policy.domain import CallSettings, Facts
from services.policy.settings import PolicySettings
from services.policy.store import PolicyStore, Relation
from shared import redis as shared_redis
from shared.service import UNAVAILABLE_ERRORS
from tests.support.redis_server import PrivateRedis

pytestmark = pytest.mark.e2e

PAIRS = 30


def expected_facts(i: int) -> Facts:
    return Facts(
        caller=f"u{i}",
        callee=f"c{i}",
        caller_premium=i % 2 == 0,
        caller_verified=i % 5 == 0,
        callee_messaged_caller=i % 2 == 0,
        callee_follows_caller=i % 3 == 0,
        callee_settings=CallSettings(enabled=False) if i == 4 else CallSettings(),
    )


@pytest.fixture
async def store(
    private_redis: PrivateRedis, make_settings: Callable[..., PolicySettings]
) -> AsyncIterator[PolicyStore]:
    # database 3: the query must read the database the URL names
    settings = make_settings(PolicySettings, redis_url=private_redis.url.replace("/0", "/3"))
    redis = shared_redis.connect(settings, name="test-policy-store")
    store = PolicyStore(redis, settings)
    now = datetime.now(UTC)
    for i in range(PAIRS):
        await store.update_user(f"u{i}", premium=i % 2 == 0, verified=i % 5 == 0, at=now)
        if i % 2 == 0:
            await store.record_dm(f"c{i}", f"u{i}")
        if i % 3 == 0:
            await store.set_relation(Relation.FOLLOWING, f"c{i}", f"u{i}", present=True, at=now)
    await store.put_settings("c4", CallSettings(enabled=False))
    yield store
    await redis.aclose()


async def all_facts(store: PolicyStore) -> list[Facts]:
    return list(await asyncio.gather(*(store.facts(f"u{i}", f"c{i}") for i in range(PAIRS))))


async def test_concurrent_queries_each_get_their_own_answer(store: PolicyStore) -> None:
    expected = [expected_facts(i) for i in range(PAIRS)]
    assert await all_facts(store) == expected
    assert [await store.facts(f"u{i}", f"c{i}") for i in range(PAIRS)] == expected


async def test_a_lost_script_is_loaded_again(store: PolicyStore) -> None:
    await store.redis.script_flush()
    assert await store.facts("u0", "c0") == expected_facts(0)
    await store.redis.script_flush()
    assert await all_facts(store) == [expected_facts(i) for i in range(PAIRS)]


async def test_the_connection_comes_back_after_redis_restarts(
    store: PolicyStore, private_redis: PrivateRedis
) -> None:
    assert await store.facts("u2", "c2") == expected_facts(2)
    await store.redis.execute_command("SAVE")  # the facts survive the restart
    private_redis.stop()
    with pytest.raises(UNAVAILABLE_ERRORS):  # what the API answers 503 for
        await store.facts("u2", "c2")
    private_redis.start()
    assert await store.facts("u2", "c2") == expected_facts(2)
    assert await all_facts(store) == [expected_facts(i) for i in range(PAIRS)]
