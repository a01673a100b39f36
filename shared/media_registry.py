"""The media node registry: how media nodes announce themselves and signaling finds one.

A media node (one process, one core) registers itself with a heartbeat; signaling puts
both legs of a call on the least-loaded live node. Keys (``<p>`` is the deployment's
Redis prefix, see shared/redis.py):

- ``<p>:media:node:<node_id>``: hash ``{node_id, url, capacity, load, draining,
  updated_at}``; expires ``ttl_s`` after the last heartbeat, so a dead node disappears by
  itself. ``draining`` is ``1`` once the node got SIGTERM: it is alive (its calls still
  flow through it while they move) but takes no new rooms, so :meth:`pick` passes it by.
  ``url`` is the node's public HTTP base (what a client POSTs its SDP offer to);
  ``capacity`` is how many calls it takes; ``load`` how many rooms it has now.
- ``<p>:media:nodes``: set of node ids that have registered (pruned of expired ones on read).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from redis.asyncio import Redis

from shared.redis import KeySpace, hgetall_many
from shared.settings import CommonSettings


@dataclass(frozen=True, slots=True)
class MediaNode:
    node_id: str
    url: str
    capacity: int
    load: int
    draining: bool = False

    def session_url(self, call_id: str) -> str:
        """Where a party POSTs its SDP offer for ``call_id`` (the contract's ``media_url``)."""
        return f"{self.url.rstrip('/')}/v1/rooms/{call_id}/sessions"

    @classmethod
    def from_hash(cls, row: dict[bytes, bytes]) -> MediaNode:
        """The node a ``<p>:media:node:<node_id>`` hash describes."""
        return cls(
            node_id=row[b"node_id"].decode(),
            url=row[b"url"].decode(),
            capacity=int(row[b"capacity"]),
            load=int(row[b"load"]),
            draining=row.get(b"draining", b"0") == b"1",
        )


# KEYS[1] the set of node ids; ARGV[1] the node hash keys' prefix, ARGV[2] a node to avoid.
# The least-utilised node with room that is not draining, its load reserved (+1).
_PICK = """
local best, best_u
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if id ~= ARGV[2] then
    local row = redis.call('HMGET', ARGV[1] .. id, 'capacity', 'load', 'draining')
    local capacity, load = tonumber(row[1]), tonumber(row[2])
    if capacity and load and row[3] ~= '1' and load < capacity then
      local u = load / capacity
      if not best or u < best_u or (u == best_u and id < best) then
        best, best_u = id, u
      end
    end
  end
end
if not best then return false end
redis.call('HINCRBY', ARGV[1] .. best, 'load', 1)
return redis.call('HGETALL', ARGV[1] .. best)
"""


class MediaRegistry:
    def __init__(self, redis: Redis, settings: CommonSettings) -> None:
        self._redis = redis
        self._keys = KeySpace(settings, "media")
        self._pick = redis.register_script(_PICK)

    def _node_key(self, node_id: str) -> str:
        return self._keys("node", node_id)

    async def heartbeat(self, node: MediaNode, ttl_s: int) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                self._node_key(node.node_id),
                mapping={
                    "node_id": node.node_id,
                    "url": node.url,
                    "capacity": node.capacity,
                    "load": node.load,
                    "draining": int(node.draining),
                    "updated_at": f"{time.time():.3f}",
                },
            )
            pipe.expire(self._node_key(node.node_id), ttl_s)
            pipe.sadd(self._keys("nodes"), node.node_id)
            await pipe.execute()

    async def deregister(self, node_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._node_key(node_id))
            pipe.srem(self._keys("nodes"), node_id)
            await pipe.execute()

    async def live_nodes(self) -> list[MediaNode]:
        members = await self._redis.smembers(self._keys("nodes"))  # type: ignore[misc]
        ids = [m.decode() if isinstance(m, bytes) else str(m) for m in members]
        rows = await hgetall_many(self._redis, map(self._node_key, ids))
        nodes = [MediaNode.from_hash(row) for row in rows if row]
        gone = [node_id for node_id, row in zip(ids, rows, strict=True) if not row]
        if gone:
            await self._redis.srem(self._keys("nodes"), *gone)
        return nodes

    async def pick(self, *, avoid: str | None = None) -> MediaNode | None:
        """The least-utilised live node with room left that is not draining (nor
        ``avoid``, the node a call is moving away from), or None.

        The pick reserves a room on it (its ``load`` goes up by one until its next
        heartbeat says how many rooms it really has): a burst of picks (a drained node's
        calls, all moved at once) spreads over the nodes instead of overfilling the one
        that looked emptiest, and stops at their capacity."""
        row = await self._pick(keys=[self._keys("nodes")], args=[self._node_key(""), avoid or ""])
        if not row:
            return None
        return MediaNode.from_hash(dict(zip(row[::2], row[1::2], strict=True)))
