"""Simulated devices: one WebSocket each, every message timestamped on arrival and routed
to the call it is about.

A message can arrive before the harness knows its call id (the ring may beat the 202 of
``POST /v1/calls``), so the router keeps messages of unknown calls and hands them to the
call's track when the scenario asks for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import websockets
from websockets.asyncio.client import ClientConnection, connect

log = logging.getLogger(__name__)

CONNECT_ATTEMPTS = 5


@dataclass(slots=True)
class Received:
    """One server-to-client message as a device saw it."""

    at: float
    """time.monotonic() on arrival."""
    wall: float
    """time.time() on arrival (compared with server timestamps such as ring_deadline)."""
    user: str
    device_id: str
    message: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.message.get("type", ""))

    @property
    def state(self) -> str:
        return str(self.message.get("state", ""))


Predicate = Callable[[Received], bool]


@dataclass
class CallTrack:
    """Everything the devices received about one call, with waiters for what comes next."""

    call_id: str
    received: list[Received] = field(default_factory=list)
    _waiters: list[tuple[Predicate, asyncio.Future[Received]]] = field(default_factory=list)

    def add(self, item: Received) -> None:
        self.received.append(item)
        if not self._waiters:
            return
        keep: list[tuple[Predicate, asyncio.Future[Received]]] = []
        for predicate, future in self._waiters:
            if future.done():
                continue
            if predicate(item):
                future.set_result(item)
            else:
                keep.append((predicate, future))
        self._waiters = keep

    def first(self, predicate: Predicate) -> Received | None:
        for item in self.received:
            if predicate(item):
                return item
        return None

    async def wait(self, predicate: Predicate, within: float) -> Received | None:
        """The first message matching ``predicate`` (already here or arriving), or None."""
        found = self.first(predicate)
        if found is not None:
            return found
        future: asyncio.Future[Received] = asyncio.get_running_loop().create_future()
        self._waiters.append((predicate, future))
        try:
            return await asyncio.wait_for(future, within)
        except TimeoutError:
            return None


def incoming_for(user: str) -> Predicate:
    return lambda r: r.user == user and r.type == "call.incoming"


def answered_elsewhere_on(device_id: str) -> Predicate:
    """The device was told to stop ringing: the call was answered on another device."""
    return lambda r: (
        r.device_id == device_id
        and r.type == "call.state"
        and bool(r.message.get("answered_elsewhere"))
    )


def state_for(user: str, *states: str) -> Predicate:
    wanted = frozenset(states)
    return lambda r: r.user == user and r.type == "call.state" and r.state in wanted


class Router:
    """Routes every device's messages to the call tracks, by ``call_id``."""

    def __init__(self, tap: Callable[[Received], bool] | None = None) -> None:
        """``tap`` sees every message first; when it returns True the message is its alone."""
        self._tap = tap
        self.tracks: dict[str, CallTrack] = {}
        self.late = 0
        self._finished: set[str] = set()
        self.messages = 0
        self.by_type: dict[str, int] = {}

    def track(self, call_id: str) -> CallTrack:
        track = self.tracks.get(call_id)
        if track is None:
            track = self.tracks[call_id] = CallTrack(call_id)
        return track

    def forget(self, call_id: str) -> None:
        """The scenario is done with this call; later messages about it are only counted."""
        self.tracks.pop(call_id, None)
        self._finished.add(call_id)

    def deliver(self, item: Received) -> None:
        self.messages += 1
        self.by_type[item.type] = self.by_type.get(item.type, 0) + 1
        if self._tap is not None and self._tap(item):
            return
        call_id = item.message.get("call_id")
        if not isinstance(call_id, str):
            return
        if call_id in self._finished:
            self.late += 1
            return
        self.track(call_id).add(item)


class Device:
    """One device of one user: a WebSocket to signaling that feeds the router."""

    def __init__(self, ws_base: str, user: str, device_id: str, token: str, router: Router) -> None:
        self.user = user
        self.device_id = device_id
        self._url = f"{ws_base}/v1/ws?" + urlencode({"token": token, "device_id": device_id})
        self._router = router
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self.closed_unexpectedly = False
        self._closing = False
        self.retries = 0
        """Connects that failed and were tried again."""

    async def connect(self, open_within: float = 20.0, attempts: int = CONNECT_ATTEMPTS) -> None:
        """Open the socket; like a real client, try again with backoff when the server drops
        the handshake (a busy server under thousands of connects can); ``retries`` counts it."""
        delay = 0.2
        for attempt in range(1, attempts + 1):
            try:
                self._ws = await connect(
                    self._url,
                    open_timeout=open_within,
                    compression="deflate",  # offered, as a browser does
                    ping_interval=None,
                    max_queue=None,
                    user_agent_header="dmcall-loadtest",
                    proxy=None,
                )
                break
            except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
                refused = isinstance(exc, websockets.InvalidStatus) and (
                    exc.response.status_code < 500
                )
                if attempt == attempts or refused:  # a 4xx (bad token) will not get better
                    raise
                self.retries += 1
                log.warning("connect of %s failed (%r); retrying", self.device_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._reader = asyncio.create_task(self._read(), name=f"ws-{self.device_id}")

    async def _read(self) -> None:
        assert self._ws is not None
        router = self._router
        try:
            async for raw in self._ws:
                at = time.monotonic()
                wall = time.time()
                try:
                    message = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(message, dict):
                    router.deliver(Received(at, wall, self.user, self.device_id, message))
        except websockets.ConnectionClosed:
            pass
        finally:
            if not self._closing:
                self.closed_unexpectedly = True

    async def send(self, message: dict[str, Any]) -> None:
        if self._ws is not None:
            await self._ws.send(json.dumps(message))

    async def close(self) -> None:
        self._closing = True
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws.close(), 5)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
