"""Builds the signaling app from its settings; clients are made in the lifespan."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from services.signaling import consumers, timers, web
from services.signaling.api import router
from services.signaling.calls import CallService
from services.signaling.presence import Hub
from services.signaling.settings import SignalingSettings
from services.signaling.store import CallStore
from services.signaling.ws import router as ws_router
from shared.media_registry import MediaRegistry
from shared.service import Runtime, create_service_app

DESCRIPTION = """Owns every call's state and the devices on WebSockets.

The device WebSocket `GET /v1/ws?token=&device_id=` (docs/signaling.md) closes with:
1001 shutting down (reconnect); 4400 bad `device_id`; 4401 token refused (sign in
again); 4409 the same device connected again (stop); 4419 the token expired (reconnect
with a fresh token; or send `{"type": "auth.refresh", "token"}` before); 4429 the user
has more than `SIGNALING_MAX_DEVICES_PER_USER` sockets and this was the oldest (stop).
`call.signal` is limited per user and call (`SIGNALING_SIGNALS_PER_CALL_PER_S`; beyond:
`error` `rate_limited`), and while a call rings it reaches the callee's
`SIGNALING_RING_SIGNAL_DEVICES` most recently connected devices.

In a call, a device may send `{"type": "call.media_state", "call_id", "audio": "on"|"muted",
"video": "on"|"off"}` (the other party's in-call device gets `call.peer`; `video: on` in an
audio call upgrades it to video); bad ones get an `error` frame (`bad_request`,
`not_found`, `conflict`, `rate_limited`) and the socket stays. When a call's media node is
draining or gone, both parties' in-call devices get `call.media` (a fresh grant on another
node, `reason` `node_draining`|`node_lost`), and `call.peer` with `connection`
`reconnecting`|`connected` tells one party about the other's media.

Group calls (`POST /v1/calls {"group", "media"}`, `POST /v1/calls/{id}/join`,
`GET /v1/groups/{g}/call`): `call.incoming` carries `group`; every joined participant's
in-call device gets `{"type": "call.participant", "call_id", "user", "state"}` on each
participant change; `call.signal` needs `"to": "<user>"` (400 `bad_request` without it)
and goes to that joined participant's in-call device only; `call.peer`, `call.media_state`
and `call.media` reach every other (every) joined participant.
"""


def create_app(settings: SignalingSettings | None = None) -> FastAPI:
    settings = settings or SignalingSettings()

    @contextlib.asynccontextmanager
    async def setup(app: FastAPI, runtime: Runtime) -> AsyncIterator[None]:
        store = CallStore(
            runtime.redis,
            settings,
            outbox_lease_ms=settings.outbox_lease_ms,
            call_retention_s=settings.call_retention_s,
        )
        hub = Hub(
            store,
            runtime.bus,
            settings.instance_id,
            max_devices_per_user=settings.max_devices_per_user,
        )
        calls = CallService(
            settings, store, hub, runtime.bus, MediaRegistry(runtime.redis, settings)
        )
        app.state.hub = hub
        app.state.calls = calls
        consumers.register(runtime.bus, calls)
        runtime.bus.on_instance_message(hub.on_instance_message)
        runtime.tasks.spawn(timers.heartbeat_loop(store, settings), name="presence-heartbeat")
        runtime.tasks.spawn(
            timers.ring_timer_loop(calls, store, settings.timer_poll_ms), name="ring-timers"
        )
        runtime.tasks.spawn(
            timers.rejoin_timer_loop(calls, store, settings.timer_poll_ms), name="rejoin-timers"
        )
        runtime.tasks.spawn(
            timers.node_watch_loop(calls, settings.node_watch_ms), name="media-node-watch"
        )
        runtime.tasks.spawn(timers.outbox_relay_loop(calls, store), name="outbox-relay")
        try:
            yield
        finally:
            with contextlib.suppress(Exception):  # Redis may be gone at shutdown
                await calls.close()
                await hub.close_all()
                await store.flush_published()
                await store.instance_gone(settings.instance_id)

    return create_service_app(
        service="signaling",
        settings=settings,
        routers=[router, ws_router, web.router],
        setup=setup,
        description=DESCRIPTION,
    )
