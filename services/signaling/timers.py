"""What every signaling instance runs in the background.

- The ring timer: every live instance watches ``ring_deadlines`` (store.py) and moves a
  call whose deadline passed to ``missed``. All may try at once; the versioned commit lets
  exactly one succeed, so ``call_missed`` is published once, and a killed instance costs
  nothing but its share of the polling.
- The rejoin timer: like the ring timer, over ``rejoin_deadlines``: a call moved to another
  media node whose media has not flowed there in time ends ``media_timeout``, once.
- The node watcher: every ``SIGNALING_NODE_WATCH_MS``, calls on media nodes that left the
  registry (crashed) or are draining move to a live node; the commit makes each move once.
- The outbox relay: an event committed by an instance that died before publishing it is
  published by whichever instance claims it once its lease is over.
- The presence heartbeat: this instance's key, whose expiry makes its devices vanish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from services.signaling.calls import CallService
from services.signaling.settings import SignalingSettings
from services.signaling.store import CallStore
from shared.contracts import parse_event

log = logging.getLogger(__name__)

OUTBOX_POLL_S = 1.0


Poll = Callable[[int], Awaitable[tuple[list[str], int | None]]]
"""``poll(now_ms)``: the call ids due now and the next deadline (ms) after them, if any."""


async def deadline_loop(
    name: str, poll: Poll, fire: Callable[[str], Awaitable[object]], poll_ms: int
) -> None:
    """Fire every call whose deadline passed, exactly once whichever instance gets there:
    ``fire`` is a versioned commit, so the others' tries are no-ops."""
    poll_s = poll_ms / 1000
    while True:
        try:
            due, upcoming = await poll(int(time.time() * 1000))
            if due:
                # A burst of deadlines is worked through together, not one after another:
                # each is a read, a commit and a publish, mostly waiting on Redis/RabbitMQ.
                results = await asyncio.gather(
                    *(fire(call_id) for call_id in due), return_exceptions=True
                )
                for call_id, result in zip(due, results, strict=True):
                    if isinstance(result, Exception):
                        log.error("%s of %s failed: %r", name, call_id, result)
            wait = poll_s
            if due:
                wait = 0.0  # look again at once: more may be due, and ``upcoming`` is stale
            elif upcoming is not None:
                wait = min(poll_s, max(upcoming - int(time.time() * 1000), 0) / 1000)
            await asyncio.sleep(max(wait, 0.002))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s pass failed; trying again", name)
            await asyncio.sleep(poll_s * 4)


async def ring_timer_loop(service: CallService, store: CallStore, poll_ms: int) -> None:
    """Ringing calls whose ring deadline passed become missed."""
    await deadline_loop("ring timeout", store.ring_poll, service.ring_timeout, poll_ms)


async def rejoin_timer_loop(service: CallService, store: CallStore, poll_ms: int) -> None:
    """Moved calls whose media did not flow on the new node in time end media_timeout."""
    await deadline_loop("rejoin timeout", store.rejoin_poll, service.rejoin_timeout, poll_ms)


async def node_watch_loop(service: CallService, interval_ms: int) -> None:
    while True:
        await asyncio.sleep(interval_ms / 1000)
        try:
            await service.move_off_unusable_nodes()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("node watch pass failed; trying again")


async def outbox_relay_loop(service: CallService, store: CallStore) -> None:
    while True:
        await asyncio.sleep(OUTBOX_POLL_S)
        try:
            claimed = await store.claim_outbox()
            for event_id, body in claimed:
                log.warning("publishing event %s its committer did not", event_id)
                await service.publish([parse_event(body)])
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("outbox relay pass failed; trying again")


async def heartbeat_loop(store: CallStore, settings: SignalingSettings) -> None:
    interval = settings.presence_ttl_s / 3
    while True:
        try:
            await store.heartbeat_instance(settings.instance_id, settings.presence_ttl_s)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("presence heartbeat failed")
        await asyncio.sleep(interval)
