"""Builds the media app from its settings; clients are made in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from fastapi import FastAPI

from services.media import aiortc_internals, consumers, metrics, registration
from services.media.api import router
from services.media.drain import Drain
from services.media.rooms import Rooms
from services.media.settings import MediaSettings
from shared.media_registry import MediaRegistry
from shared.service import Runtime, create_service_app

SHUTDOWN_CLOSE_S = 10
SHUTDOWN_STEP_S = 5
"""The longest the heartbeat's stop and the deregistration may take on the way out."""

log = logging.getLogger(__name__)


def create_app(settings: MediaSettings | None = None) -> FastAPI:
    settings = settings or MediaSettings()
    drain = Drain()

    @contextlib.asynccontextmanager
    async def setup(app: FastAPI, runtime: Runtime) -> AsyncIterator[None]:
        # Fail at start-up, not mid-call, if an aiortc upgrade moved what we rely on.
        await aiortc_internals.check_internals()
        # aioice logs every candidate pair check at INFO: a line per check per call.
        logging.getLogger("aioice").setLevel(logging.WARNING)
        aiortc_internals.configure_ice(
            settings.udp_port_range, settings.ice_addresses, settings.udp_receive_buffer_bytes
        )

        def spawn(coro: Coroutine[Any, Any, Any], name: str) -> None:
            runtime.tasks.spawn(coro, name=name)

        rooms = Rooms(settings, runtime.bus.publish, spawn)
        app.state.rooms = rooms
        consumers.register(runtime.bus, rooms)
        collector = metrics.install(rooms)
        registry = MediaRegistry(runtime.redis, settings)
        runtime.tasks.spawn(rooms.watch(), name="media-watchdog")
        beating = runtime.tasks.spawn(
            registration.heartbeat(registry, settings, rooms), name="media-heartbeat"
        )

        async def stop_when_drained() -> None:
            await rooms.drained.wait()
            log.info("media node %s drained; stopping", settings.node_id)
            drain.finished()

        runtime.tasks.spawn(stop_when_drained(), name="media-drain")
        log.info(
            "media node %s at %s (capacity %d rooms)",
            settings.node_id,
            settings.base_url,
            settings.capacity,
        )
        drain.attach(asyncio.get_running_loop(), rooms.start_drain)
        try:
            yield
        finally:
            drain.detach()
            beating.cancel()  # no beat may bring the node back after it deregistered
            # Each step of the way out is bounded: one that hangs must not keep the node.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHUTDOWN_STEP_S):
                    await asyncio.gather(beating, return_exceptions=True)
            try:
                async with asyncio.timeout(SHUTDOWN_STEP_S):
                    await registry.deregister(settings.node_id)
            except Exception as exc:
                log.warning("could not deregister media node: %r", exc)
            try:
                async with asyncio.timeout(SHUTDOWN_CLOSE_S):
                    await rooms.close_all()
            except TimeoutError:
                log.warning("rooms not all closed within %ss; leaving anyway", SHUTDOWN_CLOSE_S)
            metrics.uninstall(collector)

    app = create_service_app(
        service="media",
        settings=settings,
        routers=[router],
        setup=setup,
        description="the SFU: forwards the callers' RTP packets without decoding them. "
        "On SIGTERM it drains: new sessions are refused with 503 `node_draining`, "
        "`media_node_draining` asks for its calls to be moved, and it forwards on until "
        "both parties of each call have left it (or `MEDIA_DRAIN_S` passed), then exits.",
    )
    app.state.drain = drain
    return app
