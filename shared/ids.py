"""Identifiers: user ids, call ids, and how they are validated."""

from __future__ import annotations

import os
import re
import time
import uuid
from typing import Annotated, NewType

from pydantic import StringConstraints

USER_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_USER_ID_RE = re.compile(USER_ID_PATTERN)

UserId = Annotated[str, StringConstraints(pattern=USER_ID_PATTERN)]
"""A user id as CONTRACT.md fixes it: 1 to 64 of ``A-Z a-z 0-9 _ -``."""

GroupId = Annotated[str, StringConstraints(pattern=USER_ID_PATTERN)]
"""A group DM conversation's id: the same pattern as a user id (CONTRACT.md)."""

CallId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
"""A call id: opaque to clients; signaling makes them sortable by time (see new_call_id)."""

EventId = NewType("EventId", uuid.UUID)


def is_user_id(value: object) -> bool:
    return isinstance(value, str) and _USER_ID_RE.fullmatch(value) is not None


def new_call_id() -> str:
    """A UUIDv7-like id in hex: time-ordered, so the lesser id is the older call (glare rule)."""
    return uuid7().hex


def uuid7() -> uuid.UUID:
    """RFC 9562 UUIDv7: 48-bit Unix milliseconds, then random bits."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a = (rand >> 68) & 0xFFF
    rand_b = rand & ((1 << 62) - 1)
    value = ((ms & ((1 << 48) - 1)) << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return uuid.UUID(int=value)
