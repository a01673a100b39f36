"""Builds the policy app from its settings; clients are made in the lifespan."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from services.policy import consumers
from services.policy.api import router
from services.policy.reports import Reports
from services.policy.settings import PolicySettings
from services.policy.store import PolicyStore
from shared.service import Runtime, create_service_app


def create_app(settings: PolicySettings | None = None) -> FastAPI:
    settings = settings or PolicySettings()

    @contextlib.asynccontextmanager
    async def setup(app: FastAPI, runtime: Runtime) -> AsyncIterator[None]:
        store = PolicyStore(runtime.redis, settings)
        app.state.policy_store = store
        app.state.policy_reports = Reports(store, runtime.bus, settings)
        consumers.register(runtime.bus, store, settings)
        yield

    return create_service_app(
        service="policy",
        settings=settings,
        routers=[router],
        setup=setup,
        description="decides who may call whom, from settings and the platform's facts.",
    )
