"""Live fan-out: wakes the SSE streams of a user on whichever instance they are connected to.

The data never travels over pub/sub: every notification is in the user's Redis stream
(store.py), and an SSE connection reads its stream from its own last id. Pub/sub only says
"stream(user) grew" so a connection reads at once instead of at its next keep-alive.
That split makes the fan-out safe by construction:

- a wake-up lost (pub/sub is at most once, e.g. while Redis restarts) costs latency, not
  data: each connection reads its stream again at every keep-alive tick, and the hub wakes
  every connection after it reconnects;
- a doubled wake-up costs one empty read, never a doubled event.

One hub per process owns one pub/sub connection, subscribed to ``live:<user>`` only for the
users connected to this process (SUBSCRIBE when the first of a user's streams opens,
UNSUBSCRIBE when the last closes). Only the hub's task touches that connection; streams ask
it for changes. A stream registered before its channel's subscription is confirmed is woken
again on the confirmation, so nothing published in between waits for a keep-alive.

The hub also holds the leases that count a user's streams over every instance
(``sse:<user>`` in store.py): :meth:`LiveHub.admit` takes one (or refuses, at
``sse_max_streams_per_user``), the hub's task renews the leases of this process's open
streams and removes those that ended. A lease is only renewed while its
:class:`StreamLease` is alive, so a stream whose response was dropped before it started,
or whose instance died, lapses after ``lease_ms`` instead of holding its place for ever.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from collections import defaultdict
from dataclasses import dataclass

from redis.asyncio.client import PubSub

from services.notifications.store import NotificationStore

log = logging.getLogger(__name__)

POLL_S = 0.25
"""How long the hub waits for a message before applying subscription changes."""


@dataclass(eq=False)
class StreamLease:
    """One open stream's place among its user's ``sse_max_streams_per_user``."""

    user: str
    id: str


class LiveHub:
    def __init__(self, store: NotificationStore) -> None:
        self._store = store
        self._redis = store.redis
        self._keys = store.keys
        # Long enough that a renewal every keep-alive survives two missed ones.
        self.lease_ms = int(max(3 * store.settings.sse_keepalive_s, 10.0) * 1000)
        self._leases: weakref.WeakSet[StreamLease] = weakref.WeakSet()
        self._released: list[tuple[str, str]] = []
        self._renew_at = 0.0
        self._listeners: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._channel_user: dict[str, str] = {}
        self._subscribed: set[str] = set()
        self._changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closing = False

    @property
    def connections(self) -> int:
        return sum(len(v) for v in self._listeners.values())

    async def admit(self, user: str) -> StreamLease | None:
        """A place for one more stream of ``user``; None when they have the maximum open.
        Pass it to :meth:`leave` when the stream ends."""
        lease = StreamLease(user, f"{self._store.settings.instance_id}:{uuid.uuid4().hex}")
        if not await self._store.admit_stream(user, lease.id, self.lease_ms):
            return None
        self._leases.add(lease)
        return lease

    def leave(self, lease: StreamLease) -> None:
        """Frees a stream's place (the hub's task removes it from Redis); idempotent."""
        if lease in self._leases:
            self._leases.discard(lease)
            self._released.append((lease.user, lease.id))
            self._changed.set()

    def register(self, user: str) -> asyncio.Event:
        """A wake-up event for one stream of ``user``; pass it to :meth:`unregister` after."""
        wake = asyncio.Event()
        self._listeners[user].add(wake)
        self._changed.set()
        return wake

    def unregister(self, user: str, wake: asyncio.Event) -> None:
        listeners = self._listeners.get(user)
        if listeners is None:
            return
        listeners.discard(wake)
        if not listeners:
            del self._listeners[user]
            self._changed.set()

    def close(self) -> None:
        """Ends every stream of this process (they reconnect elsewhere with Last-Event-ID)."""
        self.closing = True
        self._wake_all()

    def close_threadsafe(self) -> None:
        """:meth:`close` from a signal handler or another thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.close)

    def _wake(self, user: str) -> None:
        for wake in self._listeners.get(user, ()):
            wake.set()

    def _wake_all(self) -> None:
        for user in self._listeners:
            self._wake(user)

    async def run(self) -> None:
        """The hub's task: owns the pub/sub connection until cancelled."""
        self._loop = asyncio.get_running_loop()
        while True:
            pubsub = self._redis.pubsub()
            self._subscribed.clear()
            self._changed.set()
            try:
                await self._serve(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: reconnect, then re-read everything
                log.warning("live hub lost Redis (%s); reconnecting", exc)
                await asyncio.sleep(0.5)
                self._wake_all()
            finally:
                try:
                    await asyncio.shield(pubsub.aclose())
                except Exception:
                    log.debug("closing the pub/sub connection failed", exc_info=True)

    async def _serve(self, pubsub: PubSub) -> None:
        while True:
            await self._apply_changes(pubsub)
            await self._renew_leases()
            if not self._subscribed:
                await self._changed.wait()
                continue
            message = await pubsub.get_message(timeout=POLL_S)
            if message is None:
                continue
            channel = message.get("channel")
            name = channel.decode() if isinstance(channel, bytes) else str(channel)
            user = self._channel_user.get(name)
            if user is not None and message.get("type") in ("message", "subscribe"):
                self._wake(user)

    async def _renew_leases(self) -> None:
        now = time.monotonic()
        if now < self._renew_at:
            return
        self._renew_at = now + self.lease_ms / 3000
        open_streams = [(lease.user, lease.id) for lease in list(self._leases)]
        if open_streams:
            await self._store.renew_streams(open_streams, self.lease_ms)

    async def _apply_changes(self, pubsub: PubSub) -> None:
        if not self._changed.is_set():
            return
        self._changed.clear()
        if self._released:
            released, self._released = self._released, []
            try:
                await self._store.release_streams(released)
            except BaseException:
                self._released.extend(released)  # tried again after the reconnect
                raise
        wanted = {self._keys.live_channel(user): user for user in self._listeners}
        added = [c for c in wanted if c not in self._subscribed]
        removed = [c for c in self._subscribed if c not in wanted]
        if added:
            self._channel_user.update({c: wanted[c] for c in added})
            await pubsub.subscribe(*added)
            self._subscribed.update(added)
        if removed:
            await pubsub.unsubscribe(*removed)
            self._subscribed.difference_update(removed)
            for channel in removed:
                self._channel_user.pop(channel, None)
