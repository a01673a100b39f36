"""Group DM conversations: who is in which group, as the platform says.

Written by policy (the platform's facts arrive there, over HTTP and as ``group.*``
events); read by signaling, which places, rings and admits a group call's members. Like
the media registry, it is a shared mechanism with its own keys. Keys (``<p>`` is the
deployment's prefix, see shared/redis.py):

- ``<p>:groups:members:<group_id>``: SET of the group's current members.
- ``<p>:groups:clock:<group_id>``: HASH user -> occurred_at (Unix µs) of the last
  membership fact applied for that user. A fact older than it is ignored, so reordered
  and redelivered facts end in the state of the newest; a remove and an add with the same
  time resolve to the remove, whichever arrives first (the rule of every platform fact).
- ``<p>:groups:of:<user>``: SET of the groups the user is a member of now (written in the
  same script as ``members``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from redis.asyncio import Redis

from shared.redis import MEMBERSHIP_FACT_LUA, KeySpace
from shared.settings import CommonSettings


@dataclass(frozen=True, slots=True)
class MembershipChange:
    applied: bool
    """False when a newer fact about this member was applied before (this one is stale)."""
    member: bool
    """Whether the user is a member now."""


def _micros(at: datetime) -> int:
    return int(at.astimezone(UTC).timestamp() * 1_000_000)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class GroupDirectory:
    def __init__(self, redis: Redis, settings: CommonSettings) -> None:
        self.redis = redis
        self.keys = KeySpace(settings, "groups")
        self._apply = redis.register_script(MEMBERSHIP_FACT_LUA)

    def members_key(self, group_id: str) -> str:
        return self.keys("members", group_id)

    def clock_key(self, group_id: str) -> str:
        return self.keys("clock", group_id)

    def groups_key(self, user: str) -> str:
        return self.keys("of", user)

    async def set_member(
        self, group_id: str, user: str, *, present: bool, at: datetime
    ) -> MembershipChange:
        """Apply one membership fact (idempotent, order-safe)."""
        applied, member = await self._apply(
            keys=[self.members_key(group_id), self.clock_key(group_id), self.groups_key(user)],
            args=[user, _micros(at), "1" if present else "0", group_id],
        )
        return MembershipChange(applied=bool(int(applied)), member=bool(int(member)))

    async def members(self, group_id: str) -> list[str]:
        """The group's current members, sorted (empty for a group nobody is in)."""
        raw = await self.redis.smembers(self.members_key(group_id))  # type: ignore[misc]
        return sorted(_text(m) for m in raw)

    async def is_member(self, group_id: str, user: str) -> bool:
        return bool(await self.redis.sismember(self.members_key(group_id), user))  # type: ignore[misc]

    async def groups_of(self, user: str) -> list[str]:
        """The groups ``user`` is a member of now, sorted."""
        raw = await self.redis.smembers(self.groups_key(user))  # type: ignore[misc]
        return sorted(_text(g) for g in raw)
