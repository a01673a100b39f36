"""The media node registry against real Redis."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from shared.media_registry import MediaNode, MediaRegistry
from shared.settings import CommonSettings


@pytest.fixture
def registry(settings: CommonSettings, redis_client: Redis) -> MediaRegistry:
    return MediaRegistry(redis_client, settings)


async def test_pick_prefers_the_least_utilised_live_node(registry: MediaRegistry) -> None:
    assert await registry.pick() is None
    await registry.heartbeat(MediaNode("m1", "http://m1:8004", capacity=10, load=5), ttl_s=30)
    await registry.heartbeat(MediaNode("m2", "http://m2:8004", capacity=40, load=10), ttl_s=30)
    await registry.heartbeat(MediaNode("m3", "http://m3:8004", capacity=5, load=5), ttl_s=30)
    picked = await registry.pick()
    assert picked is not None and picked.node_id == "m2"  # 25% < 50%; m3 is full
    assert picked.session_url("c1") == "http://m2:8004/v1/rooms/c1/sessions"


async def test_a_node_without_heartbeat_disappears(registry: MediaRegistry) -> None:
    await registry.heartbeat(MediaNode("short", "http://s:1", capacity=10, load=0), ttl_s=1)
    await registry.heartbeat(MediaNode("long", "http://l:1", capacity=10, load=9), ttl_s=30)
    assert {n.node_id for n in await registry.live_nodes()} == {"short", "long"}
    await asyncio.sleep(1.5)
    assert [n.node_id for n in await registry.live_nodes()] == ["long"]
    await registry.deregister("long")
    assert await registry.pick() is None


async def test_a_draining_node_is_live_but_never_picked(registry: MediaRegistry) -> None:
    await registry.heartbeat(MediaNode("d1", "http://d1:8004", capacity=10, load=0), ttl_s=30)
    await registry.heartbeat(MediaNode("d2", "http://d2:8004", capacity=10, load=9), ttl_s=30)
    picked = await registry.pick()
    assert picked is not None and picked.node_id == "d1"
    await registry.heartbeat(
        MediaNode("d1", "http://d1:8004", capacity=10, load=0, draining=True), ttl_s=30
    )
    live = {n.node_id: n for n in await registry.live_nodes()}
    assert live["d1"].draining and not live["d2"].draining
    picked = await registry.pick()
    assert picked is not None and picked.node_id == "d2"
    assert await registry.pick(avoid="d2") is None


async def test_a_burst_of_picks_spreads_over_the_nodes_and_stops_at_their_capacity(
    registry: MediaRegistry,
) -> None:
    """A drained node's calls all move at once: the picks reserve rooms, so they do not
    all land on the node that looked emptiest and overfill it."""
    await registry.heartbeat(MediaNode("b1", "http://b1:8004", capacity=20, load=15), ttl_s=30)
    await registry.heartbeat(MediaNode("b2", "http://b2:8004", capacity=20, load=16), ttl_s=30)
    picks = await asyncio.gather(*(registry.pick() for _ in range(12)))
    chosen = [p.node_id for p in picks if p is not None]
    assert len(chosen) == 9  # the 9 rooms left: 5 on b1, 4 on b2; then none
    assert chosen.count("b1") == 5 and chosen.count("b2") == 4
    assert picks.count(None) == 3
    # the next heartbeat says what the node really holds
    await registry.heartbeat(MediaNode("b1", "http://b1:8004", capacity=20, load=15), ttl_s=30)
    again = await registry.pick()
    assert again is not None and again.node_id == "b1"
