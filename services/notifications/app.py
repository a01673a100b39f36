"""Builds the notifications app from its settings; clients are made in the lifespan."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI

from services.notifications import consumers
from services.notifications.api import router
from services.notifications.live import LiveHub
from services.notifications.push import USER_AGENT, PushWorker
from services.notifications.settings import NotificationsSettings
from services.notifications.store import NotificationStore
from services.notifications.webpush import VapidKeys
from shared.service import Runtime, TaskSet, create_service_app


def create_app(settings: NotificationsSettings | None = None) -> FastAPI:
    settings = settings or NotificationsSettings()

    @contextlib.asynccontextmanager
    async def setup(app: FastAPI, runtime: Runtime) -> AsyncIterator[None]:
        store = NotificationStore(runtime.redis, settings)
        hub = LiveHub(store)
        app.state.notification_store = store
        app.state.live_hub = hub
        vapid = VapidKeys(settings, store) if settings.webpush_enabled else None
        app.state.vapid_keys = vapid
        consumers.register(runtime.bus, store)
        client = httpx.AsyncClient(
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
            limits=httpx.Limits(max_connections=settings.push_concurrency),
            trust_env=False,
        )
        worker = PushWorker(store, settings, client, consumer=settings.instance_id, vapid=vapid)
        # Our own set, closed before the HTTP client is: the shared one closes after setup.
        tasks = TaskSet()
        tasks.spawn(hub.run(), name="notifications-live-hub")
        tasks.spawn(worker.run_fetcher(), name="notifications-push-fetcher")
        tasks.spawn(worker.run_mover(), name="notifications-push-mover")
        tasks.spawn(worker.run_reclaimer(), name="notifications-push-reclaimer")
        try:
            yield
        finally:
            await tasks.close()
            await worker.close()
            await client.aclose()

    return create_service_app(
        service="notifications",
        settings=settings,
        routers=[router],
        setup=setup,
        description="incoming- and missed-call notifications: inbox, live stream, push "
        "(webhooks and Web Push).",
    )
