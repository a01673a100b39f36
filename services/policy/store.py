"""Policy's Redis state: settings, the platform's facts, user blocks, reports, verdicts,
the parties of the calls it authorized.

Every key is ``<prefix>:policy:...`` (``dmcall:policy:...``, or ``dmcall:<ns>:policy:...``
in tests). Relations are sets, so "does B follow A" is one ``SISMEMBER`` however many
people B follows. Facts from the platform carry ``occurred_at``; each one remembers the
time of the last change it took, and a change older than that is ignored, so reordered and
redelivered facts end in the state of the newest one. A remove and an add with the same
time resolve to the remove, whichever arrives first.

Group membership is shared/groups.py's :class:`GroupDirectory` (policy writes it, signaling
reads it); who posted in a group is policy's own (``group_posts``).

The permission query reads everything the rule needs in one round trip (one Lua script,
:data:`_PERMISSION_LUA`, run by ``EVALSHA``; redis-py loads it again if Redis lost it). The
group query is one script too (:data:`_GROUP_LUA`: every member's facts at once). The
scripts touch several users' keys, so a Redis Cluster deployment would need hash tags; a
single primary (with replicas) is what docs/operations.md describes.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from redis.asyncio import Redis

from services.policy.domain import (
    DEFAULT_SETTINGS,
    CallParties,
    CallSettings,
    Facts,
    GroupCallParties,
    GroupFacts,
    MemberFacts,
)
from shared.contracts import CallAuthorized, CallRejected, Event, parse_event
from shared.groups import GroupDirectory
from shared.redis import MEMBERSHIP_FACT_LUA, KeySpace
from shared.settings import CommonSettings

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_micros(at: datetime) -> int:
    """An aware datetime as integer microseconds since the epoch (exact, Lua-safe < 2^53)."""
    return (at.astimezone(UTC) - EPOCH) // timedelta(microseconds=1)


def from_micros(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=value)


class Relation(StrEnum):
    """A directed relation ``user -> other`` that the platform reports."""

    FOLLOWING = "following"
    """user follows other."""
    CONTACTS = "contacts"
    """other is in user's address book."""
    BLOCKS = "blocks"
    """user blocks other on the platform."""


class Keys:
    """The key shapes, each with what it holds."""

    __slots__ = ("_k",)

    def __init__(self, settings: CommonSettings) -> None:
        self._k = KeySpace(settings, "policy")

    def user(self, user: str) -> str:
        # policy:user:<user> -> hash {premium: "0"|"1", verified: "0"|"1",
        #   at: <µs occurred_at of the user.updated that set them>}; absent = defaults
        return self._k("user", user)

    def settings(self, user: str) -> str:
        # policy:settings:<user> -> hash {enabled, address_book, following, verified,
        #   groups} each "0"|"1"; absent = the defaults (on; address book, following and
        #   groups); a hash saved before ``groups`` existed lacks it: on
        return self._k("settings", user)

    def relation(self, relation: Relation, user: str) -> str:
        # policy:following:<user> -> set of user ids <user> follows
        # policy:contacts:<user>  -> set of user ids in <user>'s address book
        # policy:blocks:<user>    -> set of user ids <user> blocked on the platform
        return self._k(relation.value, user)

    def relation_clock(self, relation: Relation, user: str) -> str:
        # policy:clock:<relation>:<user> -> hash {<other>: <µs occurred_at of the last
        #   change applied to the edge user -> other>}; kept after a removal (a tombstone)
        #   so an older "add" that arrives late cannot bring the edge back
        return self._k("clock", relation.value, user)

    def dm_senders(self, recipient: str) -> str:
        # policy:dm_senders:<recipient> -> set of user ids who ever sent <recipient> a DM
        return self._k("dm_senders", recipient)

    def call_blocks(self, user: str) -> str:
        # policy:call_blocks:<user> -> set of user ids <user> blocked from calling them
        #   (PUT /v1/blocks/{user}, or by reporting a call); separate from platform blocks
        return self._k("call_blocks", user)

    def call(self, call_id: str) -> str:
        # policy:call:<call_id> -> "<caller> <callee>" (user ids hold no space): the parties
        #   of a call policy authorized, written before its call_authorized is published, so
        #   either may report the other; expires after POLICY_CALL_RETENTION_S (0: never,
        #   like signaling's call history). Rejected calls never reached the callee: absent.
        return self._k("call", call_id)

    def report_rate(self, reporter: str) -> str:
        # policy:report_rate:<reporter> -> zset of report attempt ids scored by Unix ms, the
        #   last hour (sliding-window limit POLICY_REPORTS_PER_HOUR); expires an hour after
        #   the last attempt
        return self._k("report_rate", reporter)

    def reports(self, reporter: str) -> str:
        # policy:reports:<reporter> -> hash {<call_id>: JSON of the report (the
        #   call_reported event, and "published": bool)}
        return self._k("reports", reporter)

    def group_posts(self, group_id: str) -> str:
        # policy:group_posts:<group_id> -> set of user ids who ever posted in the group
        #   (group.message_sent / POST /v1/platform/groups/{g}/messages); only grows, so
        #   any order of delivery ends the same; kept when a poster leaves the group
        return self._k("group_posts", group_id)

    def group_call(self, call_id: str) -> str:
        # policy:group_call:<call_id> -> set of user ids: the parties of a group call policy
        #   authorized (the starter and the rung invitees, written before its
        #   call_authorized is published; each member who joins, from
        #   call_participant_joined); expires like policy:call (POLICY_CALL_RETENTION_S)
        return self._k("group_call", call_id)

    def verdict(self, call_id: str) -> str:
        # policy:verdict:<call_id> -> hash {event: JSON of the call_authorized/call_rejected
        #   event decided for the call, owner: event id of the call_requested that decided
        #   it (the only one that publishes it), published: "1" once the broker confirmed};
        #   expires after POLICY_VERDICT_TTL_S
        return self._k("verdict", call_id)


# KEYS[1] user hash; ARGV: occurred_at µs, premium, verified -> applied 0|1
_USER_LUA = """
local last = redis.call('HGET', KEYS[1], 'at')
if last and tonumber(ARGV[1]) <= tonumber(last) then
  return 0
end
redis.call('HSET', KEYS[1], 'premium', ARGV[2], 'verified', ARGV[3], 'at', ARGV[1])
return 1
"""

# KEYS: user(caller), settings(callee), dm_senders(caller), contacts(callee),
#       following(callee), blocks(callee), blocks(caller), call_blocks(callee),
#       call_blocks(caller); ARGV: caller, callee
_PERMISSION_LUA = """
local u = redis.call('HMGET', KEYS[1], 'premium', 'verified')
local s = redis.call('HMGET', KEYS[2], 'enabled', 'address_book', 'following', 'verified')
return {u[1], u[2], s[1], s[2], s[3], s[4],
  redis.call('SISMEMBER', KEYS[3], ARGV[2]),
  redis.call('SISMEMBER', KEYS[4], ARGV[1]),
  redis.call('SISMEMBER', KEYS[5], ARGV[1]),
  redis.call('SISMEMBER', KEYS[6], ARGV[1]) + redis.call('SISMEMBER', KEYS[8], ARGV[1]),
  redis.call('SISMEMBER', KEYS[7], ARGV[2]) + redis.call('SISMEMBER', KEYS[9], ARGV[2])}
"""


# The group query, one round trip for a whole group. KEYS: user(starter), the group's
# members set (shared/groups.py), group_posts(group), blocks(starter), call_blocks(starter).
# ARGV: starter, then the key prefixes of settings, contacts, following, blocks and
# call_blocks (each user's key is prefix .. user), then "members" (judge every member but
# the starter) or "listed" followed by the users to judge (a call's invitees).
# -> {premium, verified, starter is member 0|1, then per judged user 12 values: user,
#     member, posted, enabled, address_book, following, verified, groups, starter in
#     contacts, follows starter, blocked starter (platform + call), starter blocked}
# Per-member keys are built inside the script from the prefixes: a single Redis primary
# (docs/operations.md); a Cluster would need the group's keys under one hash tag.
_GROUP_LUA = """
local starter = ARGV[1]
local u = redis.call('HMGET', KEYS[1], 'premium', 'verified')
local out = {u[1], u[2], redis.call('SISMEMBER', KEYS[2], starter)}
local users
if ARGV[7] == 'members' then
  users = redis.call('SMEMBERS', KEYS[2])
  table.sort(users)
else
  users = {}
  for i = 8, #ARGV do users[#users + 1] = ARGV[i] end
end
for _, m in ipairs(users) do
  if m ~= starter then
    local s = redis.call('HMGET', ARGV[2] .. m, 'enabled', 'address_book', 'following',
      'verified', 'groups')
    out[#out + 1] = m
    out[#out + 1] = redis.call('SISMEMBER', KEYS[2], m)
    out[#out + 1] = redis.call('SISMEMBER', KEYS[3], m)
    for i = 1, 5 do out[#out + 1] = s[i] or false end
    out[#out + 1] = redis.call('SISMEMBER', ARGV[3] .. m, starter)
    out[#out + 1] = redis.call('SISMEMBER', ARGV[4] .. m, starter)
    out[#out + 1] = redis.call('SISMEMBER', ARGV[5] .. m, starter)
      + redis.call('SISMEMBER', ARGV[6] .. m, starter)
    out[#out + 1] = redis.call('SISMEMBER', KEYS[4], m) + redis.call('SISMEMBER', KEYS[5], m)
  end
end
return out
"""

GROUP_FIELDS = 12
"""Values per judged user in :data:`_GROUP_LUA`'s answer."""


# KEYS[1] the reporter's rate zset; ARGV: now ms, window ms, limit, attempt id
# -> {allowed 0|1, ms until a slot frees}
_RATE_LUA = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, tonumber(oldest[2]) + window - now}
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], window)
return {1, 0}
"""

REPORT_WINDOW_MS = 3_600_000
"""The sliding window of the report rate limit (POLICY_REPORTS_PER_HOUR)."""


def _flag(raw: Any, default: bool) -> bool:
    if raw is None:
        return default
    return raw == b"1"


def _bit(value: bool) -> str:
    return "1" if value else "0"


@dataclass(frozen=True, slots=True)
class UserFacts:
    premium: bool = False
    verified: bool = False
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class RelationChange:
    applied: bool
    """False when a newer change to the same edge was already recorded."""
    present: bool
    """Whether the edge exists after this change."""


_CLAIM_VERDICT_LUA = """
-- KEYS: verdict hash, parties key. ARGV: event JSON, request id, verdict TTL, parties'
-- retention (0: for ever), parties kind ('one', 'group' or '' for none), the parties.
local key = KEYS[1]
if redis.call('HSETNX', key, 'event', ARGV[1]) == 1 then
  redis.call('HSET', key, 'owner', ARGV[2])
  redis.call('EXPIRE', key, ARGV[3])
  local retention = tonumber(ARGV[4])
  if ARGV[5] == 'one' then
    if retention > 0 then
      redis.call('SET', KEYS[2], ARGV[6], 'NX', 'EX', retention)
    else
      redis.call('SET', KEYS[2], ARGV[6], 'NX')
    end
  elseif ARGV[5] == 'group' then
    redis.call('SADD', KEYS[2], unpack(ARGV, 6))
    if retention > 0 then redis.call('EXPIRE', KEYS[2], retention) end
  end
end
return redis.call('HMGET', key, 'event', 'published', 'owner')
"""


@dataclass(frozen=True, slots=True)
class StoredVerdict:
    event: CallAuthorized | CallRejected
    published: bool
    owned: bool = False
    """This call_requested (by event id) recorded the verdict, so it is the one to publish."""


@dataclass(frozen=True, slots=True)
class RateVerdict:
    allowed: bool
    retry_after_ms: int


class PolicyStore:
    """Reads and writes policy's keys; every write is idempotent."""

    def __init__(self, redis: Redis, settings: CommonSettings) -> None:
        self.redis = redis
        self.keys = Keys(settings)
        self._relation = redis.register_script(MEMBERSHIP_FACT_LUA)
        self._user = redis.register_script(_USER_LUA)
        self._permission = redis.register_script(_PERMISSION_LUA)
        self._rate = redis.register_script(_RATE_LUA)
        self._group = redis.register_script(_GROUP_LUA)
        self._claim_verdict = redis.register_script(_CLAIM_VERDICT_LUA)
        self.groups = GroupDirectory(redis, settings)

    # ---------------------------------------------------------------- facts for the rule

    async def facts(self, caller: str, callee: str) -> Facts:
        """Everything the rule needs about caller -> callee, in one round trip."""
        k = self.keys
        keys = [
            k.user(caller),
            k.settings(callee),
            k.dm_senders(caller),
            k.relation(Relation.CONTACTS, callee),
            k.relation(Relation.FOLLOWING, callee),
            k.relation(Relation.BLOCKS, callee),
            k.relation(Relation.BLOCKS, caller),
            k.call_blocks(callee),
            k.call_blocks(caller),
        ]
        raw = await self._permission(keys=keys, args=[caller, callee])
        return Facts(
            caller=caller,
            callee=callee,
            caller_premium=_flag(raw[0], False),
            caller_verified=_flag(raw[1], False),
            callee_settings=_settings_from(raw[2:6]),
            callee_messaged_caller=bool(raw[6]),
            caller_in_callee_contacts=bool(raw[7]),
            callee_follows_caller=bool(raw[8]),
            callee_blocked_caller=bool(raw[9]),
            caller_blocked_callee=bool(raw[10]),
        )

    async def group_facts(
        self, group_id: str, starter: str, invitees: list[str] | None = None
    ) -> GroupFacts:
        """Everything a group verdict needs, in one round trip (one script).

        ``invitees``: the users to judge (a call's, as listed); None judges every current
        member but the starter, sorted by id (the permission query)."""
        k = self.keys
        keys = [
            k.user(starter),
            self.groups.members_key(group_id),
            k.group_posts(group_id),
            k.relation(Relation.BLOCKS, starter),
            k.call_blocks(starter),
        ]
        args = [
            starter,
            k.settings(""),
            k.relation(Relation.CONTACTS, ""),
            k.relation(Relation.FOLLOWING, ""),
            k.relation(Relation.BLOCKS, ""),
            k.call_blocks(""),
            *(["members"] if invitees is None else ["listed", *invitees]),
        ]
        raw = await self._group(keys=keys, args=args)
        members = []
        for i in range(3, len(raw), GROUP_FIELDS):
            v = raw[i : i + GROUP_FIELDS]
            members.append(
                MemberFacts(
                    user=v[0].decode(),
                    member=bool(v[1]),
                    posted=bool(v[2]),
                    settings=_settings_from(v[3:8]),
                    starter_in_contacts=bool(v[8]),
                    follows_starter=bool(v[9]),
                    blocked_starter=bool(v[10]),
                    starter_blocked=bool(v[11]),
                )
            )
        return GroupFacts(
            group=group_id,
            starter=starter,
            starter_member=bool(raw[2]),
            starter_premium=_flag(raw[0], False),
            starter_verified=_flag(raw[1], False),
            invitees=tuple(members),
        )

    # ---------------------------------------------------------------- settings

    async def get_settings(self, user: str) -> CallSettings:
        raw = await self.redis.hmget(self.keys.settings(user), list(_SETTINGS_FIELDS))
        return _settings_from(raw)

    async def put_settings(self, user: str, settings: CallSettings) -> None:
        await self.redis.hset(
            self.keys.settings(user),
            mapping={
                "enabled": _bit(settings.enabled),
                "address_book": _bit(settings.allow_address_book),
                "following": _bit(settings.allow_following),
                "verified": _bit(settings.allow_verified),
                "groups": _bit(settings.allow_groups),
            },
        )

    # ---------------------------------------------------------------- platform facts

    async def update_user(self, user: str, *, premium: bool, verified: bool, at: datetime) -> bool:
        applied = await self._user(
            keys=[self.keys.user(user)], args=[to_micros(at), _bit(premium), _bit(verified)]
        )
        return bool(applied)

    async def get_user(self, user: str) -> UserFacts:
        premium, verified, at = await self.redis.hmget(
            self.keys.user(user), ["premium", "verified", "at"]
        )
        return UserFacts(
            premium=_flag(premium, False),
            verified=_flag(verified, False),
            updated_at=from_micros(int(at)) if at is not None else None,
        )

    async def set_relation(
        self, relation: Relation, user: str, other: str, *, present: bool, at: datetime
    ) -> RelationChange:
        applied, now_present = await self._relation(
            keys=[self.keys.relation(relation, user), self.keys.relation_clock(relation, user)],
            args=[other, to_micros(at), "1" if present else "0"],
        )
        return RelationChange(applied=bool(applied), present=bool(now_present))

    async def has_relation(self, relation: Relation, user: str, other: str) -> bool:
        return bool(await self.redis.sismember(self.keys.relation(relation, user), other))

    async def record_dm(self, sender: str, recipient: str) -> bool:
        """A DM was sent; True if it is the first from sender to recipient that we know of."""
        return bool(await self.redis.sadd(self.keys.dm_senders(recipient), sender))

    async def set_group_member(
        self, group_id: str, user: str, *, present: bool, at: datetime
    ) -> RelationChange:
        """Apply a membership fact to the group directory (idempotent, order-safe)."""
        change = await self.groups.set_member(group_id, user, present=present, at=at)
        return RelationChange(applied=change.applied, present=change.member)

    async def record_group_post(self, group_id: str, sender: str) -> bool:
        """``sender`` posted in the group; True if it is the first post of theirs we know of."""
        return bool(await self.redis.sadd(self.keys.group_posts(group_id), sender))

    async def group_posters(self, group_id: str) -> list[str]:
        raw = await self.redis.smembers(self.keys.group_posts(group_id))
        return sorted(m.decode() if isinstance(m, bytes) else m for m in raw)

    async def groups_with_members(self, user: str) -> list[tuple[str, list[str]]]:
        """The user's groups, sorted, each with its members (two round trips)."""
        groups = await self.groups.groups_of(user)
        if not groups:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for group_id in groups:
                pipe.smembers(self.groups.members_key(group_id))
            replies = await pipe.execute()
        return [
            (group_id, sorted(m.decode() for m in members))
            for group_id, members in zip(groups, replies, strict=True)
        ]

    # ---------------------------------------------------------------- user blocks

    async def block_calls(self, user: str, other: str) -> bool:
        return bool(await self.redis.sadd(self.keys.call_blocks(user), other))

    async def unblock_calls(self, user: str, other: str) -> bool:
        return bool(await self.redis.srem(self.keys.call_blocks(user), other))

    async def call_blocks(self, user: str) -> list[str]:
        members = await self.redis.smembers(self.keys.call_blocks(user))
        return sorted(m.decode() if isinstance(m, bytes) else m for m in members)

    # ---------------------------------------------------------------- calls and reports

    async def add_group_call_parties(
        self, call_id: str, users: list[str], retention_s: int
    ) -> None:
        key = self.keys.group_call(call_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(key, *users)
            if retention_s:
                pipe.expire(key, retention_s)
            await pipe.execute()

    async def is_group_call(self, call_id: str) -> bool:
        return bool(await self.redis.exists(self.keys.group_call(call_id)))

    async def call_parties(self, call_id: str) -> CallParties | GroupCallParties | None:
        """The parties of a call policy authorized; None for a call it never authorized.

        A call authorized before the parties were recorded has only its verdict (while
        POLICY_VERDICT_TTL_S lasts): that answers too.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.keys.call(call_id))
            pipe.smembers(self.keys.group_call(call_id))
            pipe.hget(self.keys.verdict(call_id), "event")
            recorded, group_parties, verdict = await pipe.execute()
        if recorded is not None:
            caller, _, callee = recorded.decode().partition(" ")
            return CallParties(caller, callee)
        if group_parties:
            return GroupCallParties(frozenset(m.decode() for m in group_parties))
        if verdict is not None:
            event = parse_event(verdict)
            if isinstance(event, CallAuthorized) and event.callee is not None:
                return CallParties(event.caller, event.callee)
            if isinstance(event, CallAuthorized):
                return GroupCallParties(frozenset([event.caller, *event.ring]))
        return None

    async def take_report_slot(self, reporter: str, limit: int) -> RateVerdict:
        """Count one new report by ``reporter`` unless ``limit`` were filed in the last hour."""
        now = time.time_ns() // 1_000_000
        allowed, retry_ms = await self._rate(
            keys=[self.keys.report_rate(reporter)],
            args=[now, REPORT_WINDOW_MS, limit, uuid.uuid4().hex],
        )
        return RateVerdict(bool(int(allowed)), int(retry_ms))

    async def get_report(self, reporter: str, call_id: str) -> Event | None:
        raw = await self.redis.hget(self.keys.reports(reporter), call_id)
        return None if raw is None else parse_event(json.loads(raw)["event"])

    async def record_report(self, event: Event, reporter: str, call_id: str) -> Event:
        """Record the report once; returns the stored one (the first, on a repeat)."""
        key = self.keys.reports(reporter)
        stored = {"event": event.model_dump(mode="json"), "published": False}
        if await self.redis.hsetnx(key, call_id, json.dumps(stored)):
            return event
        existing = await self.redis.hget(key, call_id)
        assert existing is not None
        return parse_event(json.loads(existing)["event"])

    async def report_published(self, reporter: str, call_id: str) -> bool:
        raw = await self.redis.hget(self.keys.reports(reporter), call_id)
        return raw is not None and bool(json.loads(raw)["published"])

    async def mark_report_published(self, event: Event, reporter: str, call_id: str) -> None:
        stored = {"event": event.model_dump(mode="json"), "published": True}
        await self.redis.hset(self.keys.reports(reporter), call_id, json.dumps(stored))

    # ---------------------------------------------------------------- verdicts

    async def claim_verdict(
        self,
        event: CallAuthorized | CallRejected,
        request_id: str,
        ttl_s: int,
        *,
        retention_s: int = 0,
    ) -> StoredVerdict:
        """Record the verdict on a call unless one is recorded; returns the one that stands.

        The first ``call_requested`` (by event id) to record it owns its publication: only
        a delivery of that same event publishes, so two requests for one call handled at
        once never both publish. The verdict that records itself records, in the same
        script, an authorized call's parties (the starter and rung invitees of a group
        call) for ``retention_s`` (0: for ever): a call never has a verdict without them.
        """
        if isinstance(event, CallRejected):
            parties_key, kind, parties = self.keys.call(event.call_id), "", []
        elif event.group is None:
            assert event.callee is not None
            parties_key, kind = self.keys.call(event.call_id), "one"
            parties = [f"{event.caller} {event.callee}"]
        else:
            parties_key, kind = self.keys.group_call(event.call_id), "group"
            parties = [event.caller, *event.ring]
        raw, published, owner = await self._claim_verdict(
            keys=[self.keys.verdict(event.call_id), parties_key],
            args=[event.to_json(), request_id, ttl_s, retention_s, kind, *parties],
        )
        stored = parse_event(raw)
        assert isinstance(stored, CallAuthorized | CallRejected)
        return StoredVerdict(
            event=stored, published=published == b"1", owned=owner == request_id.encode()
        )

    async def mark_verdict_published(
        self, call_id: str, ttl_s: int, *, done_mark: tuple[str, int] | None = None
    ) -> None:
        """The broker confirmed the verdict; with ``done_mark`` (the bus's key and TTL) the
        call_requested is marked handled in the same round trip."""
        key = self.keys.verdict(call_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, "published", "1")
            pipe.expire(key, ttl_s, nx=True)  # never a key without expiry
            if done_mark is not None:
                pipe.set(done_mark[0], b"done", ex=done_mark[1])
            await pipe.execute()


_SETTINGS_FIELDS = ("enabled", "address_book", "following", "verified", "groups")


def _settings_from(raw: list[Any]) -> CallSettings:
    """Settings from their hash fields in :data:`_SETTINGS_FIELDS` order (the 1:1 query
    reads the first four: ``groups`` does not enter the 1:1 rule)."""
    enabled, address_book, following, verified, *rest = raw
    groups = rest[0] if rest else None
    if all(v is None for v in (enabled, address_book, following, verified, groups)):
        return DEFAULT_SETTINGS
    return CallSettings(
        enabled=_flag(enabled, DEFAULT_SETTINGS.enabled),
        allow_address_book=_flag(address_book, DEFAULT_SETTINGS.allow_address_book),
        allow_following=_flag(following, DEFAULT_SETTINGS.allow_following),
        allow_verified=_flag(verified, DEFAULT_SETTINGS.allow_verified),
        allow_groups=_flag(groups, DEFAULT_SETTINGS.allow_groups),
    )
