"""Devices and delivery: which instance holds a device's socket, and getting a message there.

Presence lives in Redis (see store.py: ``presence:<user>`` and ``instance:<id>``), so any
instance can reach any device: a message for a device on this instance is written to its
socket; one for a device elsewhere goes to that instance's inbox through
``Bus.send_to_instance``. Messages are transient: a device that is not connected misses
them and reads ``GET /v1/ring-state`` when it comes back.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
    per_device: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    """Extra fields for a given device (e.g. the answering device's media token)."""


class Hub:
    """This instance's sockets, and delivery to any device of any instance."""

    def __init__(self, store: CallStore, bus: Bus, instance_id: str) -> None:
        self._store = store
        self._bus = bus
        self.instance_id = instance_id
        self._local: dict[tuple[str, str], _Connection] = {}

    # ------------------------------------------------------------------ sockets

    async def attach(self, user: str, device_id: str, socket: Socket) -> Socket | None:
        """Register a device's socket here; returns the socket it replaces, if any."""
        await self._store.register_device(user, device_id, self.instance_id)
        previous = self._local.get((user, device_id))
        self._local[(user, device_id)] = _Connection(socket)
        SOCKETS.set(len(self._local))
        return previous.socket if previous else None

    async def detach(self, user: str, device_id: str, socket: Socket) -> None:
        current = self._local.get((user, device_id))
        if current is None or current.socket is not socket:
            return  # replaced by a newer socket of the same device
        del self._local[(user, device_id)]
        SOCKETS.set(len(self._local))
        await self._store.unregister_device(user, device_id, self.instance_id)

    async def close_all(self) -> None:
        for (user, device_id), conn in list(self._local.items()):
            try:
                await self._store.unregister_device(user, device_id, self.instance_id)
                await conn.socket.close(1001, "server shutting down")
            except Exception:  # best effort on shutdown
                log.debug("closing %s/%s failed", user, device_id, exc_info=True)
        self._local.clear()

    @property
    def local_count(self) -> int:
        return len(self._local)

    # ------------------------------------------------------------------ delivery

    async def deliver(self, pushes: Sequence[Push]) -> None:
        """Send each push to its devices, wherever their sockets are."""
        if not pushes:
            return
        users = sorted({push.user for push in pushes})
        presence = await self._store.devices_of(users)
        by_instance: dict[str, list[list[Any]]] = defaultdict(list)
        for push in pushes:
            devices = presence[push.user]
            for device_id, instance_id in devices.items():
                if push.devices is not None and device_id not in push.devices:
                    continue
                if device_id in push.except_devices:
                    continue
                message = {**push.message, **push.per_device.get(device_id, {})}
                by_instance[instance_id].append([push.user, device_id, message])
        await asyncio.gather(*(self._send(i, items) for i, items in by_instance.items()))

    async def _send(self, instance_id: str, items: list[list[Any]]) -> None:
        if instance_id == self.instance_id:
            PUSHES.labels("local").inc(len(items))
            await self.deliver_local(items)
            return
        PUSHES.labels("other_instance").inc(len(items))
        body = json.dumps({"deliveries": items}).encode()
        try:
            await self._bus.send_to_instance(SERVICE, instance_id, body)
        except Exception:  # a push is transient; the call state is not
            log.warning("push to instance %s failed", instance_id, exc_info=True)

    async def on_instance_message(self, body: bytes, headers: Mapping[str, Any]) -> None:
        payload = json.loads(body)
        await self.deliver_local(payload["deliveries"])

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
