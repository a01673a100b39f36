"""This node in the media registry: a heartbeat with its URL, capacity and load, and a
deregistration on shutdown (see shared/media_registry.py for the keys)."""

from __future__ import annotations

import logging

from services.media.rooms import Rooms
from services.media.settings import MediaSettings
from shared.clock import wait_set
from shared.media_registry import MediaNode, MediaRegistry

log = logging.getLogger(__name__)


def describe(settings: MediaSettings, rooms: Rooms) -> MediaNode:
    return MediaNode(
        node_id=settings.node_id,
        url=settings.base_url,
        capacity=settings.capacity,
        load=rooms.load,
        draining=rooms.draining,
    )


async def heartbeat(registry: MediaRegistry, settings: MediaSettings, rooms: Rooms) -> None:
    """Beat every ``MEDIA_HEARTBEAT_S``, and at once when the load changes or the node
    starts draining (it beats on, ``draining=1``, until it deregisters)."""
    while True:
        rooms.load_changed.clear()
        try:
            await registry.heartbeat(describe(settings, rooms), ttl_s=settings.registry_ttl_s)
        except Exception as exc:  # Redis down: keep serving calls, retry on the next beat
            log.warning("media registry heartbeat failed: %s", exc)
        await wait_set(rooms.load_changed, settings.heartbeat_s)
