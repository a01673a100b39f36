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
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from services.notifications.store import Keys

log = logging.getLogger(__name__)

POLL_S = 0.25
"""How long the hub waits for a message before applying subscription changes."""


class LiveHub:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._listeners: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._channel_user: dict[str, str] = {}
        self._subscribed: set[str] = set()
        self._changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closing = False

    @property
    def connections(self) -> int:
        return sum(len(v) for v in self._listeners.values())

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

    async def _apply_changes(self, pubsub: PubSub) -> None:
        if not self._changed.is_set():
            return
        self._changed.clear()
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
