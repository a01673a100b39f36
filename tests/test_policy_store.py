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
from services.policy.store import CallParties, GroupCallParties, PolicyStore, Relation
from shared import redis as shared_redis
from shared.contracts import CallAuthorized, CallRejected, MediaKind, RejectReason
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


async def test_the_first_verdict_records_an_authorized_calls_parties_with_it(
    store: PolicyStore,
) -> None:
    """claim_verdict records the verdict and an authorized call's parties in one script,
    for POLICY_CALL_RETENTION_S; a later verdict for the call changes neither."""
    redis = store.redis
    one = CallAuthorized(call_id="c-one", caller="ann", callee="ben", media=MediaKind.AUDIO)
    first = await store.claim_verdict(one, "req-1", 3_600, retention_s=600)
    assert first.owned and not first.published and first.event == one
    assert await store.call_parties("c-one") == CallParties("ann", "ben")
    assert 590 < await redis.ttl(store.keys.call("c-one")) <= 600
    assert 3_590 < await redis.ttl(store.keys.verdict("c-one")) <= 3_600
    # A second call_requested for the call, decided otherwise: the first verdict stands.
    other = CallAuthorized(call_id="c-one", caller="ann", callee="cat", media=MediaKind.AUDIO)
    second = await store.claim_verdict(other, "req-2", 3_600, retention_s=600)
    assert not second.owned and second.event == one
    assert await store.call_parties("c-one") == CallParties("ann", "ben")

    group = CallAuthorized(
        call_id="c-group",
        caller="ann",
        group="g1",
        ring=["ben", "cat"],
        media=MediaKind.VIDEO,
    )
    await store.claim_verdict(group, "req-3", 3_600)  # retention 0: kept for ever
    assert await store.call_parties("c-group") == GroupCallParties(frozenset({"ann", "ben", "cat"}))
    assert await redis.ttl(store.keys.group_call("c-group")) == -1

    rejected = CallRejected(
        call_id="c-no",
        caller="ann",
        callee="dan",
        reason=RejectReason.NO_PRIOR_DM,
    )
    await store.claim_verdict(rejected, "req-4", 3_600, retention_s=600)
    assert not await redis.exists(store.keys.call("c-no"), store.keys.group_call("c-no"))
    assert await store.call_parties("c-no") is None
