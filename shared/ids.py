"""Identifiers: user, group, call and device ids, and the one pattern they all follow."""

from __future__ import annotations

import os
import re
import time
import uuid
from typing import Annotated, TypeGuard

from pydantic import StringConstraints

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""Every id a client names (user, group, call, device): 1 to 64 of ``A-Z a-z 0-9 _ -``,
as CONTRACT.md fixes it for user ids."""
_ID_RE = re.compile(ID_PATTERN)

UserId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]

GroupId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
"""A group DM conversation's id (CONTRACT.md)."""

CallId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
"""A call id: opaque to clients; signaling makes them sortable by time (see new_call_id)."""

DeviceId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
"""A user's device as the client names it (the device WebSocket's ``device_id``)."""


def is_id(value: object) -> TypeGuard[str]:
    """``value`` is an id of :data:`ID_PATTERN` (a user's, a call's, a device's...)."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


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
