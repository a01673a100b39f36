"""Devices and delivery: which instance holds a device's socket, and getting a message there.

Presence lives in Redis (see store.py: ``presence:<user>`` and ``instance:<id>``), so any
instance can reach any device: a message for a device on this instance is written to its
socket; one for a device elsewhere goes to that instance's inbox through
``Bus.send_to_instance``. Messages are transient: a device that is not connected misses
them and reads ``GET /v1/ring-state`` when it comes back.

A user has at most ``SIGNALING_MAX_DEVICES_PER_USER`` sockets, counted in Redis across all
instances: attaching one more closes the oldest (:attr:`CloseCode.TOO_MANY_DEVICES`),
wherever it is.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol

from prometheus_client import Counter, Gauge

from services.signaling.store import CallStore
from shared.bus import Bus

log = logging.getLogger(__name__)

SOCKETS = Gauge("dmcall_signaling_sockets", "Device WebSockets open on this instance")
PUSHES = Counter(
    "dmcall_signaling_pushes_total", "Messages for devices, by where they went", ["route"]
)

SERVICE = "signaling"
INSTANCE_PUSH_TIMEOUT_S = 2.0
"""How long a push for a device on another instance waits for the broker: the request that
made it waits too, and a push that late is stale (the device reads the ring state)."""


class CloseCode(IntEnum):
    """Why the server closed a device socket (application codes; docs/signaling.md), and
    what the client should do about it."""

    SHUTTING_DOWN = 1001
    """The instance is going away: reconnect (with backoff)."""
    BAD_REQUEST = 4400
    """The connect request was malformed (``device_id``): do not retry it unchanged."""
    UNAUTHORIZED = 4401
    """The token was refused at connect: sign in again."""
    REPLACED = 4409
    """The same device connected again: this socket is obsolete; do not reconnect."""
    TOKEN_EXPIRED = 4419
    """The socket's token ran out: reconnect at once with a fresh token."""
    TOO_MANY_DEVICES = 4429
    """The user opened more sockets than allowed and this was the oldest: do not reconnect
    by yourself (that would close another of the user's devices)."""


class Socket(Protocol):
    async def send_text(self, data: str) -> None: ...

    async def close(self, code: int = 1000, reason: str | None = None) -> None: ...


@dataclass
class _Connection:
    socket: Socket
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True, slots=True)
class Push:
    """One message for one user's devices: all of them, or only ``devices``."""

    user: str
    message: dict[str, Any]
    devices: frozenset[str] | None = None
    except_devices: frozenset[str] = frozenset()
    newest: int | None = None
    """At most this many of the devices, the most recently connected."""


class Hub:
    """This instance's sockets, and delivery to any device of any instance."""

    def __init__(
        self, store: CallStore, bus: Bus, instance_id: str, *, max_devices_per_user: int = 0
    ) -> None:
        self._store = store
        self._bus = bus
        self.instance_id = instance_id
        self._max_devices = max_devices_per_user
        self._local: dict[tuple[str, str], _Connection] = {}
        self._closing: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ sockets

    async def attach(self, user: str, device_id: str, socket: Socket) -> Socket | None:
        """Register a device's socket here; returns the socket it replaces, if any. The
        user's oldest sockets over the cap are closed, on whichever instance they are."""
        elsewhere, evicted = await self._store.register_device(
            user, device_id, self.instance_id, max_devices=self._max_devices
        )
        previous = self._local.get((user, device_id))
        self._local[(user, device_id)] = _Connection(socket)
        SOCKETS.set(len(self._local))
        if elsewhere is not None:  # the same device, connected again through another instance
            self._spawn_close(elsewhere, [[user, device_id, int(CloseCode.REPLACED)]])
        if evicted:
            log.info("user %s over %d devices: closing %d", user, self._max_devices, len(evicted))
            by_instance: dict[str, list[list[Any]]] = defaultdict(list)
            for old_device, instance_id in evicted:
                by_instance[instance_id].append([user, old_device, int(CloseCode.TOO_MANY_DEVICES)])
            for instance_id, closes in by_instance.items():
                self._spawn_close(instance_id, closes)
        return previous.socket if previous else None

    def _spawn_close(self, instance_id: str, closes: list[list[Any]]) -> None:
        # Not awaited by the socket attaching: another instance is reached through the
        # broker, and a slow broker must not hold a new socket's start.
        task = asyncio.get_running_loop().create_task(self._close_on(instance_id, closes))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_on(self, instance_id: str, closes: list[list[Any]]) -> None:
        if instance_id == self.instance_id:
            await self.close_local(closes)
            return
        body = json.dumps({"close": closes}).encode()
        try:
            await self._bus.send_to_instance(
                SERVICE, instance_id, body, timeout_s=INSTANCE_PUSH_TIMEOUT_S
            )
        except Exception:  # that socket no longer gets pushes: it left presence
            log.warning("asking instance %s to close sockets failed", instance_id, exc_info=True)

    async def close_local(self, closes: Sequence[Sequence[Any]]) -> None:
        """Close these (user, device_id, code) sockets of this instance, saying why first."""
        for user, device_id, code in closes:
            conn = self._local.get((str(user), str(device_id)))
            if conn is None:
                continue
            reason = CloseCode(int(code))
            if reason is CloseCode.TOO_MANY_DEVICES:
                note = {
                    "type": "error",
                    "error": "too_many_devices",
                    "message": f"more than {self._max_devices} devices connected; this, the "
                    "oldest, is closed",
                }
                await self.send(str(user), str(device_id), note, only=conn.socket)
            try:
                await conn.socket.close(reason.value, reason.name.lower())
            except Exception:  # gone already
                log.debug("closing %s/%s failed", user, device_id, exc_info=True)

    async def detach(self, user: str, device_id: str, socket: Socket) -> None:
        current = self._local.get((user, device_id))
        if current is None or current.socket is not socket:
            return  # replaced by a newer socket of the same device
        del self._local[(user, device_id)]
        SOCKETS.set(len(self._local))
        await self._store.unregister_device(user, device_id, self.instance_id)

    async def close_all(self) -> None:
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)
        for (user, device_id), conn in list(self._local.items()):
            try:
                await self._store.unregister_device(user, device_id, self.instance_id)
                await conn.socket.close(CloseCode.SHUTTING_DOWN, "server shutting down")
            except Exception:  # best effort on shutdown
                log.debug("closing %s/%s failed", user, device_id, exc_info=True)
        self._local.clear()

    # ------------------------------------------------------------------ delivery

    async def deliver(
        self, pushes: Sequence[Push], presence: Mapping[str, Mapping[str, str]] | None = None
    ) -> None:
        """Send each push to its devices, wherever their sockets are (``newest``: only to
        that many of them, the most recently connected). ``presence``: the pushed users'
        :meth:`CallStore.devices_of`, if read already."""
        if not pushes:
            return
        if presence is None:
            presence = await self._store.devices_of(sorted({push.user for push in pushes}))
        by_instance: dict[str, list[list[Any]]] = defaultdict(list)
        for push in pushes:
            devices = presence[push.user]  # newest first
            sent = 0
            for device_id, instance_id in devices.items():
                if push.newest is not None and sent >= push.newest:
                    break
                if push.devices is not None and device_id not in push.devices:
                    continue
                if device_id in push.except_devices:
                    continue
                by_instance[instance_id].append([push.user, device_id, push.message])
                sent += 1
        await asyncio.gather(*(self._send(i, items) for i, items in by_instance.items()))

    async def _send(self, instance_id: str, items: list[list[Any]]) -> None:
        if instance_id == self.instance_id:
            PUSHES.labels("local").inc(len(items))
            await self.deliver_local(items)
            return
        PUSHES.labels("other_instance").inc(len(items))
        body = json.dumps({"deliveries": items}).encode()
        try:
            await self._bus.send_to_instance(
                SERVICE, instance_id, body, timeout_s=INSTANCE_PUSH_TIMEOUT_S
            )
        except Exception:  # a push is transient; the call state is not
            log.warning("push to instance %s failed", instance_id, exc_info=True)

    async def on_instance_message(self, body: bytes, headers: Mapping[str, Any]) -> None:
        payload = json.loads(body)
        if "deliveries" in payload:
            await self.deliver_local(payload["deliveries"])
        if "close" in payload:
            await self.close_local(payload["close"])

    async def deliver_local(self, items: Sequence[Sequence[Any]]) -> None:
        for user, device_id, message in items:
            await self.send(str(user), str(device_id), message)

    async def send(
        self, user: str, device_id: str, message: dict[str, Any], *, only: Socket | None = None
    ) -> bool:
        """Write to the device's socket here (``only``: if it is still that socket)."""
        conn = self._local.get((user, device_id))
        if conn is None or (only is not None and conn.socket is not only):
            return False
        text = json.dumps(message)
        try:
            async with conn.lock:
                await conn.socket.send_text(text)
        except Exception:  # the socket went away; its reader cleans up
            log.debug("send to %s/%s failed", user, device_id, exc_info=True)
            return False
        return True
