"""Signaling's Redis keys, and the one script that commits every change to a call.

Keys (``<p>`` is the deployment's prefix, ``dmcall`` or ``dmcall:<namespace>``; then
``signaling``). Single Redis, not Cluster: one commit touches several calls' keys.

- ``<p>:signaling:call:<call_id>``: HASH, one call: ``call_id caller callee media state
  created_at version`` and, when set, ``end_reason reject_reason ring_deadline answered_at
  ended_at answered_device caller_device media_node media_url replaced_by
  rejoin_deadline`` (times ISO-8601 UTC). ``version`` grows by one with every commit; a
  commit names the version it read.
- ``<p>:signaling:call:<call_id>`` also holds ``group`` (a group call) and
  ``participants``: JSON user -> {state, role, joined_at, left_at, device, rung, since,
  present_s}, written in the same versioned commit as the rest of the call.
- ``<p>:signaling:live:<user>``: SET of the user's calls that are not final: as caller from
  creation, as callee from ringing (or a glare accept); a group call's participant while
  it rings for them or they are joined. Busy and glare are read from it.
- ``<p>:signaling:group_call:<group>``: STRING the group's live call id, set by the commit
  that places it (which fails if it names another call) and deleted by the commit that
  ends it.
- ``<p>:signaling:history:<user>``: ZSET, all scores 0, members call ids; call ids are
  time-ordered hex, so lexicographic order is time order (newest = greatest). The callee's
  entry appears when the call rings (never for a call policy rejected); a group call's
  participant's once it rang for them or they joined. With ``SIGNALING_CALL_RETENTION_S``
  a commit that adds to it removes the calls placed before the retention and sets the
  key's TTL to it (a user who stops calling loses the key); the call hash of an ended call
  gets the same TTL from the commit that ends it (a later commit renews it).
- ``<p>:signaling:ring_deadlines``: ZSET call_id -> ring deadline (Unix ms). Every live
  instance polls it; the commit that moves the call to ``missed`` (a group call: every
  invitee it still rings for) removes the entry, and the version check lets exactly one
  instance make that commit.
- ``<p>:signaling:node_calls:<node_id>``: SET of the calls in progress (accepted or active)
  whose media is on that media node; written in the same commit as the call, so a call is
  in exactly its current node's set.
- ``<p>:signaling:call_nodes``: SET of the media node ids whose ``node_calls`` set is not
  empty (the commit removes a node when its set empties). The node watcher reads it to
  find calls on nodes that are gone or draining.
- ``<p>:signaling:rejoin_deadlines``: ZSET call_id -> Unix ms by which media must flow on
  the node a call moved to (else it ends ``media_timeout``). Polled by every instance like
  the ring deadlines; the commit that clears or passes the deadline removes the entry.
- ``<p>:signaling:outbox``: HASH event_id -> event JSON, written in the same commit as the
  transition that produced the event; removed once the event is published.
- ``<p>:signaling:outbox_due``: ZSET event_id -> Unix ms after which any instance may
  publish it (the committer publishes at once; this is for a committer that died).
- ``<p>:signaling:idem:<user>:<key>``: STRING call_id of the call placed with that
  ``Idempotency-Key``; expires after ``SIGNALING_IDEMPOTENCY_TTL_S``. It is reserved
  (for ``IDEMPOTENCY_RESERVE_MS``) in the same script that takes the placement's rate slot,
  so concurrent retries with one key take one slot; the commit makes it permanent.
- ``<p>:signaling:rate:<user>``: ZSET of placement ids scored by Unix ms, the last 60 s
  (sliding-window rate limit); expires 60 s after the last placement.
- ``<p>:signaling:presence:<user>``: HASH device_id -> instance_id holding its socket.
- ``<p>:signaling:devices:<user>``: ZSET device_id -> Unix ms its socket attached; the same
  members as ``presence:<user>`` (written and removed together), for the order: the oldest
  is closed when a user has more than ``SIGNALING_MAX_DEVICES_PER_USER``, and ringing-time
  signals go to the newest ``SIGNALING_RING_SIGNAL_DEVICES``.
- ``<p>:signaling:signal_rate:<user>:<call_id>``: HASH ``tokens at``, the token bucket of
  the user's ``call.signal`` frames for that call, whichever socket sends them
  (``SIGNALING_SIGNALS_PER_CALL_PER_S``); expires once full again.
- ``<p>:signaling:instance:<instance_id>``: STRING ``alive`` with a TTL of
  ``SIGNALING_PRESENCE_TTL_S``, refreshed by the instance's heartbeat; a device whose
  instance key is gone is gone too (pruned from presence on read).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from redis.asyncio import Redis

from services.signaling.domain import (
    IN_CALL_STATES,
    LIVE_STATES,
    Call,
    Participant,
    ParticipantState,
)
from shared.bus import AlreadyHandled
from shared.contracts import CallState, EndReason, Event, MediaKind, RejectReason
from shared.redis import KeySpace, hgetall_many
from shared.settings import CommonSettings

log = logging.getLogger(__name__)

RATE_WINDOW_MS = 60_000
IDEMPOTENCY_RESERVE_MS = 30_000
"""How long an ``Idempotency-Key`` stays reserved for a placement that has not committed yet."""
OUTBOX_FLUSH_S = 0.1
"""How long published events wait to be cleared from the outbox together."""
_RANG_STATES = frozenset({CallState.RINGING, CallState.BUSY, CallState.ACCEPTED})
"""A call enters the callee's history when it reaches one of these (it reached the callee)."""

_PRESENCE_OF = """
-- presence_of(hashes, orders, prefix): for each user (their presence hash and device
-- order set), device/instance pairs on live instances (instance keys ``prefix .. id``),
-- newest first, flattened after a count; devices of dead instances are pruned from both.
local function presence_of(hashes, orders, prefix)
  local alive = {}
  local out = {}
  for u = 1, #hashes do
    local hash, order = hashes[u], orders[u]
    local row = redis.call('HGETALL', hash)
    local where = {}
    for i = 1, #row, 2 do where[row[i]] = row[i + 1] end
    local found = {}
    local seen = {}
    local function take(device)
      local instance = where[device]
      if seen[device] then return end
      seen[device] = true
      if alive[instance] == nil then
        alive[instance] = redis.call('EXISTS', prefix .. instance) == 1
      end
      if alive[instance] then
        found[#found + 1] = device
        found[#found + 1] = instance
      else
        redis.call('HDEL', hash, device)
        redis.call('ZREM', order, device)
      end
    end
    for _, device in ipairs(redis.call('ZREVRANGE', order, 0, -1)) do
      if where[device] == nil then redis.call('ZREM', order, device) else take(device) end
    end
    for i = 1, #row, 2 do take(row[i]) end
    out[#out + 1] = #found
    for _, v in ipairs(found) do out[#out + 1] = v end
  end
  return out
end
"""

_COMMIT = (
    _PRESENCE_OF
    + """
local plan = cjson.decode(ARGV[1])
if plan.done and redis.call('GET', plan.done[1]) == 'done' then return {4} end
for _, c in ipairs(plan.calls) do
  local v = tonumber(redis.call('HGET', c.key, 'version') or '0')
  if v ~= tonumber(c.expect) then return {0, c.key, v} end
end
if plan.group then
  local cur = redis.call('GET', plan.group[1])
  if cur and cur ~= plan.group[2] then return {3, cur} end
end
if plan.claim then
  local cur = redis.call('GET', plan.claim[1])
  if cur and cur ~= plan.claim[2] then return {2, cur} end
  redis.call('SET', plan.claim[1], plan.claim[2], 'PX', plan.claim[3])
end
if plan.group then redis.call('SET', plan.group[1], plan.group[2]) end
if plan.release then
  if redis.call('GET', plan.release[1]) == plan.release[2] then
    redis.call('DEL', plan.release[1])
  end
end
for _, c in ipairs(plan.calls) do
  if c.fields then
    local args = {}
    for k, val in pairs(c.fields) do
      args[#args + 1] = k
      args[#args + 1] = val
    end
    args[#args + 1] = 'version'
    args[#args + 1] = tostring(tonumber(c.expect) + 1)
    redis.call('HSET', c.key, unpack(args))
    if #c.del > 0 then redis.call('HDEL', c.key, unpack(c.del)) end
  end
end
for _, op in ipairs(plan.sadd) do redis.call('SADD', op[1], op[2]) end
for _, op in ipairs(plan.srem) do redis.call('SREM', op[1], op[2]) end
for _, op in ipairs(plan.zadd) do redis.call('ZADD', op[1], op[2], op[3]) end
for _, op in ipairs(plan.zrem) do redis.call('ZREM', op[1], op[2]) end
for _, op in ipairs(plan.prune) do
  if redis.call('SCARD', op[1]) == 0 then redis.call('SREM', op[2], op[3]) end
end
for _, o in ipairs(plan.outbox) do
  redis.call('HSET', KEYS[1], o[1], o[2])
  redis.call('ZADD', KEYS[2], o[3], o[1])
end
if plan.done then redis.call('SET', plan.done[1], 'done', 'EX', plan.done[2]) end
if plan.expire then
  for _, op in ipairs(plan.expire) do redis.call('PEXPIRE', op[1], op[2]) end
end
if plan.trim then
  for _, k in ipairs(plan.trim.keys) do
    redis.call('ZREMRANGEBYLEX', k, '-', '(' .. plan.trim.below)
    redis.call('PEXPIRE', k, plan.trim.ttl)
  end
end
if plan.presence then
  return {1, presence_of(plan.presence[1], plan.presence[2], plan.presence[3])}
end
return {1}
"""
)

_CLAIM_OUTBOX = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local body = redis.call('HGET', KEYS[1], id)
  if body then
    redis.call('ZADD', KEYS[2], ARGV[2], id)
    out[#out + 1] = id
    out[#out + 1] = body
  else
    redis.call('ZREM', KEYS[2], id)
  end
end
return out
"""

_PLACE = """
-- KEYS[1]: the caller's rate window; KEYS[2], if given: the Idempotency-Key.
-- ARGV: now ms, window ms, limit, a member for this placement, its call id, reserve ms.
-- {2, call_id}: the key was used (a replay, no slot taken); {0, retry_ms}: over the
-- limit; {1, 0}: a slot taken and the key reserved for this call id.
if KEYS[2] then
  local cur = redis.call('GET', KEYS[2])
  if cur then return {2, cur} end
end
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, tonumber(oldest[2]) + window - now}
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], window)
if KEYS[2] then redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[6]) end
return {1, 0}
"""

_SIGNAL_BUCKET = """
-- KEYS[1]: one user's bucket for one call; ARGV: now ms, rate a second, burst.
local now, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(held[1]) or burst
local at = tonumber(held[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
local taken = 0
if tokens >= 1 then
  tokens = tokens - 1
  taken = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return taken
"""

_PRESENCE = (
    _PRESENCE_OF
    + """
-- KEYS: n presence hashes, then the same n users' device-order sets; ARGV[1]: the
-- instance-key prefix.
local n = #KEYS / 2
local hashes, orders = {}, {}
for u = 1, n do
  hashes[u] = KEYS[u]
  orders[u] = KEYS[n + u]
end
return presence_of(hashes, orders, ARGV[1])
"""
)

_ATTACH_DEVICE = """
-- KEYS[1]: the user's presence hash, KEYS[2]: their device order. ARGV: device, instance,
-- now ms, the cap, the instance-key prefix. Registers the device; if the user then has
-- more than the cap, the oldest others are removed. Returns the instance that held this
-- device's socket before (if another, else ''), then the removed device/instance pairs
-- (devices of dead instances are dropped first, and never count).
local before = redis.call('HGET', KEYS[1], ARGV[1])
if not before or before == ARGV[2] then before = '' end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local cap = tonumber(ARGV[4])
local members = redis.call('ZRANGE', KEYS[2], 0, -1)
local count = #members
if count <= cap then return {before} end
for _, device in ipairs(members) do
  if device ~= ARGV[1] then
    local instance = redis.call('HGET', KEYS[1], device)
    if not instance then
      redis.call('ZREM', KEYS[2], device)
      count = count - 1
    elseif redis.call('EXISTS', ARGV[5] .. instance) == 0 then
      redis.call('HDEL', KEYS[1], device)
      redis.call('ZREM', KEYS[2], device)
      count = count - 1
    end
  end
end
local evicted = {before}
for _, device in ipairs(members) do
  if count <= cap then break end
  if device ~= ARGV[1] then
    local instance = redis.call('HGET', KEYS[1], device)
    if instance then
      redis.call('HDEL', KEYS[1], device)
      redis.call('ZREM', KEYS[2], device)
      evicted[#evicted + 1] = device
      evicted[#evicted + 1] = instance
      count = count - 1
    end
  end
end
return evicted
"""

_LIVE_CALLS = """
-- KEYS: live-call sets; ARGV[1]: the call-key prefix. Each user's live calls as a count,
-- then each call's hash as a flat field/value list after its own length.
local out = {}
for _, key in ipairs(KEYS) do
  local ids = redis.call('SMEMBERS', key)
  table.sort(ids)
  local rows = {}
  for _, id in ipairs(ids) do
    local row = redis.call('HGETALL', ARGV[1] .. id)
    if #row > 0 then rows[#rows + 1] = row end
  end
  out[#out + 1] = #rows
  for _, row in ipairs(rows) do
    out[#out + 1] = #row
    for _, v in ipairs(row) do out[#out + 1] = v end
  end
end
return out
"""

_RING_POLL = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {due, first[2] or false}
"""

_FORGET_NODE_CALL = """
-- KEYS[1]: a node's node_calls set, KEYS[2]: call_nodes; ARGV: the call id, the node id.
redis.call('SREM', KEYS[1], ARGV[1])
if redis.call('SCARD', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[2]) end
return 1
"""

_UNREGISTER_DEVICE = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""


class Conflict(Exception):
    """Another commit changed one of the calls first; re-read and decide again."""


class _CallStands(Exception):
    """A placement found a call that stands already: ``call_id``."""

    def __init__(self, call_id: str) -> None:
        super().__init__(call_id)
        self.call_id = call_id


class GroupCallInProgress(_CallStands):
    """The group has a live call already, ``call_id`` (join it)."""


class IdempotentReplay(_CallStands):
    """The idempotency key was used before: ``call_id`` is the call it made."""


@dataclass(frozen=True, slots=True)
class RateVerdict:
    allowed: bool
    retry_after_ms: int
    replay_of: str | None = None
    """The call an earlier placement with the same ``Idempotency-Key`` made (no slot taken)."""


def _devices(users: Sequence[str], flat: Sequence[Any]) -> dict[str, dict[str, str]]:
    """``presence_of``'s reply, per user."""
    found: dict[str, dict[str, str]] = {}
    i = 0
    for user in users:
        count = int(flat[i])
        pairs = flat[i + 1 : i + 1 + count]
        i += 1 + count
        found[user] = {_text(pairs[k]): _text(pairs[k + 1]) for k in range(0, count, 2)}
    return found


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


_TIME_FIELDS = ("created_at", "ring_deadline", "answered_at", "ended_at", "rejoin_deadline")
_OPTIONAL_TEXT = ("answered_device", "caller_device", "media_node", "media_url", "replaced_by")


def encode_call(call: Call) -> tuple[dict[str, str], list[str]]:
    """Hash fields to set and field names to delete (None values)."""
    values = {
        **call.text_fields(),
        "participants": json.dumps(
            {user: part.encode() for user, part in sorted(call.participants.items())},
            separators=(",", ":"),
        ),
    }
    for name in _TIME_FIELDS:
        when: datetime | None = getattr(call, name)
        values[name] = when.isoformat() if when else None
    for name in _OPTIONAL_TEXT:
        values[name] = getattr(call, name)
    fields = {k: v for k, v in values.items() if v is not None}
    deletes = [k for k, v in values.items() if v is None]
    return fields, deletes


def decode_call(row: Mapping[Any, Any]) -> Call:
    get = {_text(k): _text(v) for k, v in row.items()}

    def when(name: str) -> datetime | None:
        return datetime.fromisoformat(get[name]) if name in get else None

    created = when("created_at")
    assert created is not None
    participants = {
        user: Participant.decode(raw)
        for user, raw in json.loads(get.get("participants", "{}")).items()
    }
    return Call(
        call_id=get["call_id"],
        caller=get["caller"],
        callee=get.get("callee"),
        media=MediaKind(get["media"]),
        state=CallState(get["state"]),
        created_at=created,
        version=int(get.get("version", "0")),
        end_reason=EndReason(get["end_reason"]) if "end_reason" in get else None,
        reject_reason=RejectReason(get["reject_reason"]) if "reject_reason" in get else None,
        ring_deadline=when("ring_deadline"),
        answered_at=when("answered_at"),
        ended_at=when("ended_at"),
        answered_device=get.get("answered_device"),
        caller_device=get.get("caller_device"),
        media_node=get.get("media_node"),
        media_url=get.get("media_url"),
        replaced_by=get.get("replaced_by"),
        rejoin_deadline=when("rejoin_deadline"),
        group=get.get("group"),
        participants=participants,
    )


@dataclass
class Commit:
    """Everything one atomic step writes: calls (with the versions read), indexes, events."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    sadd: list[list[str]] = field(default_factory=list)
    srem: list[list[str]] = field(default_factory=list)
    zadd: list[list[str]] = field(default_factory=list)
    zrem: list[list[str]] = field(default_factory=list)
    prune: list[list[str]] = field(default_factory=list)
    """[set, index, member]: after the rest, ``member`` leaves ``index`` if ``set`` is empty."""
    events: list[Event] = field(default_factory=list)
    claim: list[str] | None = None
    group_claim: list[str] | None = None
    """[key, call_id]: the group's one live call; the commit fails (GroupCallInProgress)
    if the key names another call."""
    group_release: list[str] | None = None
    """[key, call_id]: the key is deleted if it still names this call."""
    done: tuple[str, int] | None = None
    """The bus's done mark of the event this commit handles (``Delivery.done_mark``): the
    commit fails (AlreadyHandled) if it is set, else sets it."""
    expire: list[list[str]] = field(default_factory=list)
    """[key, ms]: the key expires that long after the commit (an ended call's record)."""
    history: set[str] = field(default_factory=set)
    """History keys the commit adds to: with a retention, trimmed and given its TTL."""


class CallStore:
    """Calls, their indexes, the outbox, presence and rate limits in Redis."""

    def __init__(
        self,
        redis: Redis,
        settings: CommonSettings,
        *,
        outbox_lease_ms: int,
        call_retention_s: int = 0,
    ) -> None:
        """``call_retention_s`` (0: for ever) bounds the call history: an ended call's
        record expires that long after its last change, and a history keeps the calls
        placed within it."""
        self.redis = redis
        self._retention_ms = call_retention_s * 1000
        self.keys = KeySpace(settings, "signaling")
        self.ring_key = self.keys("ring_deadlines")
        self.rejoin_key = self.keys("rejoin_deadlines")
        self.call_nodes_key = self.keys("call_nodes")
        self.outbox_key = self.keys("outbox")
        self.outbox_due_key = self.keys("outbox_due")
        self._outbox_lease_ms = outbox_lease_ms
        self._commit = redis.register_script(_COMMIT)
        self._claim_outbox = redis.register_script(_CLAIM_OUTBOX)
        self._place = redis.register_script(_PLACE)
        self._signal_bucket = redis.register_script(_SIGNAL_BUCKET)
        self._attach = redis.register_script(_ATTACH_DEVICE)
        self._unregister = redis.register_script(_UNREGISTER_DEVICE)
        self._presence = redis.register_script(_PRESENCE)
        self._live = redis.register_script(_LIVE_CALLS)
        self._ring_poll = redis.register_script(_RING_POLL)
        self._forget_node_call = redis.register_script(_FORGET_NODE_CALL)
        self._published: set[str] = set()
        self._flush: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ keys

    def call_key(self, call_id: str) -> str:
        return self.keys("call", call_id)

    def live_key(self, user: str) -> str:
        return self.keys("live", user)

    def history_key(self, user: str) -> str:
        return self.keys("history", user)

    def group_call_key(self, group: str) -> str:
        return self.keys("group_call", group)

    def node_calls_key(self, node_id: str) -> str:
        return self.keys("node_calls", node_id)

    def idem_key(self, user: str, key: str) -> str:
        return self.keys("idem", user, key)

    def rate_key(self, user: str) -> str:
        return self.keys("rate", user)

    def presence_key(self, user: str) -> str:
        return self.keys("presence", user)

    def devices_key(self, user: str) -> str:
        return self.keys("devices", user)

    def signal_rate_key(self, user: str, call_id: str) -> str:
        return self.keys("signal_rate", user, call_id)

    def instance_key(self, instance_id: str) -> str:
        return self.keys("instance", instance_id)

    # ------------------------------------------------------------------ calls

    async def get(self, call_id: str) -> Call | None:
        row = await self.redis.hgetall(self.call_key(call_id))  # type: ignore[misc]
        return decode_call(row) if row else None

    async def get_many(self, call_ids: Sequence[str]) -> list[Call]:
        if not call_ids:
            return []
        rows = await hgetall_many(self.redis, map(self.call_key, call_ids))
        return [decode_call(row) for row in rows if row]

    async def live_calls(self, user: str) -> list[Call]:
        return (await self.live_calls_of([user]))[user]

    async def live_calls_of(self, users: Sequence[str]) -> dict[str, list[Call]]:
        """Each user's calls that are not final (by call id), in one round trip."""
        flat = await self._live(
            keys=[self.live_key(u) for u in users], args=[self.keys("call", "")]
        )
        found: dict[str, list[Call]] = {}
        i = 0
        for user in users:
            count = int(flat[i])
            i += 1
            calls = []
            for _ in range(count):
                size = int(flat[i])
                row = flat[i + 1 : i + 1 + size]
                i += 1 + size
                calls.append(decode_call(dict(zip(row[::2], row[1::2], strict=True))))
            found[user] = calls
        return found

    async def history(
        self, user: str, *, limit: int, before: str | None
    ) -> tuple[list[Call], str | None]:
        """Up to ``limit`` calls older than ``before``, newest first, and the next cursor."""
        upper = f"({before}" if before else "+"
        lower = f"({self._history_cutoff()}" if self._retention_ms else "-"
        raw = await self.redis.zrevrangebylex(
            self.history_key(user), upper, lower, start=0, num=limit
        )
        ids = [_text(i) for i in raw]
        cursor = ids[-1] if len(ids) == limit else None
        return await self.get_many(ids), cursor

    # ------------------------------------------------------------------ commits

    def stage(self, commit: Commit, before: Call | None, after: Call) -> None:
        """Add one call's change, and the index changes its state change implies."""
        fields, deletes = encode_call(after)
        commit.calls.append(
            {
                "key": self.call_key(after.call_id),
                "expect": str(before.version if before else 0),
                "fields": fields,
                "del": deletes,
            }
        )
        cid = after.call_id
        if after.group is not None:
            self._stage_group(commit, before, after)
        else:
            self._stage_one_to_one(commit, before, after)
        before_node = before.media_node if before and before.state in IN_CALL_STATES else None
        after_node = after.media_node if after.state in IN_CALL_STATES else None
        if after_node:
            commit.sadd.append([self.node_calls_key(after_node), cid])
            commit.sadd.append([self.call_nodes_key, after_node])
        if before_node and before_node != after_node:
            commit.srem.append([self.node_calls_key(before_node), cid])
            commit.prune.append(
                [self.node_calls_key(before_node), self.call_nodes_key, before_node]
            )
        if after.state in IN_CALL_STATES and after.rejoin_deadline is not None:
            commit.zadd.append([self.rejoin_key, str(_ms(after.rejoin_deadline)), cid])
        elif before is not None and before.rejoin_deadline is not None:
            commit.zrem.append([self.rejoin_key, cid])
        if self._retention_ms and after.state not in LIVE_STATES:
            commit.expire.append([self.call_key(cid), str(self._retention_ms)])

    def _add_history(self, commit: Commit, user: str, call_id: str) -> None:
        key = self.history_key(user)
        commit.zadd.append([key, "0", call_id])
        commit.history.add(key)

    def _history_cutoff(self) -> str:
        """The least call id placed within the retention (ids start with their Unix ms)."""
        return f"{int(time.time() * 1000) - self._retention_ms:012x}"

    def _stage_one_to_one(self, commit: Commit, before: Call | None, after: Call) -> None:
        cid = after.call_id
        callee = after.peer
        if after.state in LIVE_STATES:
            commit.sadd.append([self.live_key(after.caller), cid])
            if after.state is not CallState.REQUESTED:
                commit.sadd.append([self.live_key(callee), cid])
        else:
            commit.srem.append([self.live_key(after.caller), cid])
            commit.srem.append([self.live_key(callee), cid])
        if after.replaced_by:
            commit.zrem.append([self.history_key(after.caller), cid])
            commit.zrem.append([self.history_key(callee), cid])
        else:
            self._add_history(commit, after.caller, cid)
            if after.state in _RANG_STATES:
                self._add_history(commit, callee, cid)
        if after.state is CallState.RINGING and after.ring_deadline is not None:
            commit.zadd.append([self.ring_key, str(_ms(after.ring_deadline)), cid])
        elif before is not None and before.state is CallState.RINGING:
            commit.zrem.append([self.ring_key, cid])

    def _stage_group(self, commit: Commit, before: Call | None, after: Call) -> None:
        """A group call, per participant: ``live:<user>`` while it rings for them or they
        are joined (the starter: from placement); ``history:<user>`` once it rang for them
        or they joined (never for a member not rung who never joined); the ring deadline
        while it rings for anyone; the group's one live call (``group_call:<group>``)."""
        assert after.group is not None
        cid = after.call_id
        live = after.state in LIVE_STATES
        for user, part in after.participants.items():
            here = part.state in (ParticipantState.RINGING, ParticipantState.JOINED)
            if live and here:
                commit.sadd.append([self.live_key(user), cid])
            else:
                commit.srem.append([self.live_key(user), cid])
            if user == after.caller or part.rung or part.joined_at is not None:
                self._add_history(commit, user, cid)
        if live and after.ring_deadline is not None and after.ringing():
            commit.zadd.append([self.ring_key, str(_ms(after.ring_deadline)), cid])
        elif before is not None:
            commit.zrem.append([self.ring_key, cid])
        key = self.group_call_key(after.group)
        if live:
            commit.group_claim = [key, cid]
        else:
            commit.group_release = [key, cid]

    async def group_call(self, group: str) -> Call | None:
        """The group's live call, if any."""
        raw = await self.redis.get(self.group_call_key(group))
        if raw is None:
            return None
        call = await self.get(_text(raw))
        return call if call is not None and call.state in LIVE_STATES else None

    def check(self, commit: Commit, unchanged: Iterable[Call]) -> None:
        """The commit fails if any of these calls changed since they were read."""
        staged = {c["key"] for c in commit.calls}
        for call in unchanged:
            key = self.call_key(call.call_id)
            if key not in staged:
                commit.calls.append({"key": key, "expect": str(call.version)})

    async def commit(
        self, commit: Commit, *, devices_of: Sequence[str] = ()
    ) -> dict[str, dict[str, str]]:
        """Apply atomically, or raise Conflict / IdempotentReplay; nothing is half-written.
        Returns :meth:`devices_of` these users, read in the same round trip after the
        commit applied (the pushes it makes go there)."""
        due = str(int(time.time() * 1000) + self._outbox_lease_ms)
        plan = {
            "calls": commit.calls,
            "sadd": commit.sadd,
            "srem": commit.srem,
            "zadd": commit.zadd,
            "zrem": commit.zrem,
            "prune": commit.prune,
            "outbox": [[str(e.event_id), e.model_dump_json(), due] for e in commit.events],
        }
        if commit.claim is not None:
            plan["claim"] = commit.claim
        if commit.group_claim is not None:
            plan["group"] = commit.group_claim
        if commit.group_release is not None:
            plan["release"] = commit.group_release
        if commit.done is not None:
            plan["done"] = commit.done
        if commit.expire:
            plan["expire"] = commit.expire
        if self._retention_ms and commit.history:
            plan["trim"] = {
                "keys": sorted(commit.history),
                "below": self._history_cutoff(),
                "ttl": self._retention_ms,
            }
        if devices_of:
            plan["presence"] = [*self._presence_keys(devices_of), self.keys("instance", "")]
        result = await self._commit(
            keys=[self.outbox_key, self.outbox_due_key], args=[json.dumps(plan)]
        )
        status = int(result[0])
        if status == 0:
            raise Conflict(_text(result[1]))
        if status == 2:
            raise IdempotentReplay(_text(result[1]))
        if status == 3:
            raise GroupCallInProgress(_text(result[1]))
        if status == 4:
            raise AlreadyHandled(commit.done[0] if commit.done else "")
        return _devices(devices_of, result[1]) if devices_of else {}

    # ------------------------------------------------------------------ outbox

    def outbox_done_soon(self, event_ids: Sequence[str]) -> None:
        """Clear published events from the outbox in a moment, together with the others
        published meanwhile: one round trip for many calls' events under load. Should the
        process die first, the relay publishes them again and consumers drop the copies."""
        if not event_ids:
            return
        self._published.update(event_ids)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().create_task(self._flush_published())

    async def _flush_published(self) -> None:
        await asyncio.sleep(OUTBOX_FLUSH_S)
        ids = sorted(self._published)
        self._published = set()
        self._flush = None  # ids published from here on get the next flush
        try:
            await self.outbox_done(ids)
        except Exception as exc:  # the relay publishes them again; consumers deduplicate
            log.warning("could not clear %d published events from the outbox: %r", len(ids), exc)

    async def flush_published(self) -> None:
        """Clear what is pending now (shutdown)."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        ids, self._published = sorted(self._published), set()
        await self.outbox_done(ids)

    async def outbox_done(self, event_ids: Sequence[str]) -> None:
        if not event_ids:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self.outbox_key, *event_ids)
            pipe.zrem(self.outbox_due_key, *event_ids)
            await pipe.execute()

    async def claim_outbox(self, limit: int = 50) -> list[tuple[str, bytes]]:
        """Events whose committer did not publish them in time; leased to this instance."""
        now = int(time.time() * 1000)
        flat = await self._claim_outbox(
            keys=[self.outbox_key, self.outbox_due_key],
            args=[now, now + self._outbox_lease_ms, limit],
        )
        return [(_text(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]

    # ------------------------------------------------------------------ ring timers

    async def ring_poll(self, now_ms: int, limit: int = 100) -> tuple[list[str], int | None]:
        """The calls whose ring deadline is past (at most ``limit``) and the earliest deadline
        still waiting, in one round trip."""
        due, first = await self._ring_poll(keys=[self.ring_key], args=[now_ms, limit])
        return [_text(i) for i in due], int(first) if first else None

    async def drop_ring(self, call_id: str) -> None:
        await self.redis.zrem(self.ring_key, call_id)

    # ------------------------------------------------------------------ media nodes

    async def call_nodes(self) -> list[str]:
        """The media nodes that host calls in progress."""
        members = await self.redis.smembers(self.call_nodes_key)  # type: ignore[misc]
        return sorted(_text(m) for m in members)

    async def node_calls(self, node_id: str) -> list[str]:
        """The calls in progress on ``node_id``."""
        members = await self.redis.smembers(self.node_calls_key(node_id))  # type: ignore[misc]
        return sorted(_text(m) for m in members)

    async def forget_node_call(self, node_id: str, call_id: str) -> None:
        """Drop a stale index entry (the call is no longer on that node)."""
        await self._forget_node_call(
            keys=[self.node_calls_key(node_id), self.call_nodes_key], args=[call_id, node_id]
        )

    async def rejoin_poll(self, now_ms: int, limit: int = 100) -> tuple[list[str], int | None]:
        """Calls whose rejoin deadline passed, and the earliest one still waiting."""
        due, first = await self._ring_poll(keys=[self.rejoin_key], args=[now_ms, limit])
        return [_text(i) for i in due], int(first) if first else None

    async def drop_rejoin(self, call_id: str) -> None:
        await self.redis.zrem(self.rejoin_key, call_id)

    # ------------------------------------------------------------------ rate limit

    async def take_placement(
        self, user: str, limit: int, *, idempotency_key: str | None, call_id: str
    ) -> RateVerdict:
        """A slot in the caller's minute, and the ``Idempotency-Key`` reserved for
        ``call_id``, at once: a placement whose key was used before takes no slot."""
        now = int(time.time() * 1000)
        keys = [self.rate_key(user)]
        if idempotency_key:
            keys.append(self.idem_key(user, idempotency_key))
        status, value = await self._place(
            keys=keys,
            args=[now, RATE_WINDOW_MS, limit, uuid.uuid4().hex, call_id, IDEMPOTENCY_RESERVE_MS],
        )
        if int(status) == 2:
            return RateVerdict(True, 0, replay_of=_text(value))
        return RateVerdict(bool(int(status)), int(value))

    async def placed_with(self, user: str, idempotency_key: str) -> str | None:
        """The call ``user`` placed with that ``Idempotency-Key``, if any."""
        raw = await self.redis.get(self.idem_key(user, idempotency_key))
        return _text(raw) if raw is not None else None

    async def take_signal_token(
        self, user: str, call_id: str, *, rate_per_s: float, burst: float
    ) -> bool:
        """One ``call.signal`` of ``user`` for ``call_id``, from any socket on any instance."""
        now = int(time.time() * 1000)
        taken = await self._signal_bucket(
            keys=[self.signal_rate_key(user, call_id)], args=[now, rate_per_s, burst]
        )
        return bool(int(taken))

    # ------------------------------------------------------------------ presence

    async def heartbeat_instance(self, instance_id: str, ttl_s: int) -> None:
        await self.redis.set(self.instance_key(instance_id), b"alive", ex=ttl_s)

    async def instance_gone(self, instance_id: str) -> None:
        await self.redis.delete(self.instance_key(instance_id))

    async def register_device(
        self, user: str, device_id: str, instance_id: str, *, max_devices: int = 0
    ) -> tuple[str | None, list[tuple[str, str]]]:
        """Register a device's socket. Returns the other instance that held this device's
        socket until now, if any, and (with ``max_devices``) the user's oldest other
        devices over that many, unregistered now, as (device_id, instance_id) to close."""
        flat = await self._attach(
            keys=[self.presence_key(user), self.devices_key(user)],
            args=[
                device_id,
                instance_id,
                int(time.time() * 1000),
                max_devices or 2**31,
                self.keys("instance", ""),
            ],
        )
        before = _text(flat[0]) or None
        pairs = [(_text(flat[i]), _text(flat[i + 1])) for i in range(1, len(flat), 2)]
        return before, pairs

    async def unregister_device(self, user: str, device_id: str, instance_id: str) -> None:
        await self._unregister(
            keys=[self.presence_key(user), self.devices_key(user)], args=[device_id, instance_id]
        )

    async def devices(self, user: str) -> dict[str, str]:
        """device_id -> instance_id of the user's devices on live instances."""
        return (await self.devices_of([user]))[user]

    async def devices_of(self, users: Sequence[str]) -> dict[str, dict[str, str]]:
        """:meth:`devices` of several users in one round trip, whatever their number, each
        user's newest first; the devices of instances whose heartbeat expired are pruned on
        the way."""
        hashes, orders = self._presence_keys(users)
        flat = await self._presence(keys=hashes + orders, args=[self.keys("instance", "")])
        return _devices(users, flat)

    def _presence_keys(self, users: Sequence[str]) -> tuple[list[str], list[str]]:
        return [self.presence_key(u) for u in users], [self.devices_key(u) for u in users]
