"""Builds the policy app from its settings; clients are made in the lifespan."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.types import ASGIApp

from services.policy import consumers
from services.policy.api import router
from services.policy.deps import CachingVerifier
from services.policy.fastpath import PermissionFastPath
from services.policy.settings import PolicySettings
from services.policy.store import PolicyStore
from shared.auth import TokenVerifier
from shared.service import Runtime, create_service_app

SERVICE = "policy"

log = logging.getLogger(__name__)


def create_app(settings: PolicySettings | None = None) -> FastAPI:
    settings = settings or PolicySettings()

    @contextlib.asynccontextmanager
    async def setup(app: FastAPI, runtime: Runtime) -> AsyncIterator[None]:
        store = PolicyStore(runtime.redis, settings)
        app.state.policy_store = store
        app.state.policy_verifier = CachingVerifier(
            TokenVerifier(settings), settings.token_cache_size
        )
        consumers.register(runtime.bus, store, settings)
        try:
            yield
        finally:
            store.close()

    app = create_service_app(
        service=SERVICE,
        settings=settings,
        routers=[router],
        setup=setup,
        title="dmcall policy",
        description="decides who may call whom, from settings and the platform's facts.",
    )
    _put_fast_path_in_front(app, settings)
    return app


def _put_fast_path_in_front(app: FastAPI, settings: PolicySettings) -> None:
    """The permission query's fast path goes in front of the whole middleware stack
    (tracing included), the way the tracing instrumentation itself wraps it."""
    build_stack = app.build_middleware_stack

    def build_with_fast_path() -> ASGIApp:
        return PermissionFastPath(build_stack(), service=SERVICE, settings=settings)

    app.build_middleware_stack = build_with_fast_path  # type: ignore[method-assign]
