"""Every service's routes are tried in the order that serves its traffic: its own API
first, then the operations routes, then FastAPI's docs (shared/service.create_app). Each
route a request passes costs FastAPI ~10,000 CPU instructions (docs/performance.md), and
the docs and operations routes had come first. The docs still answer from the end."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.routing import BaseRoute

from services.media.app import create_app as media_app
from services.notifications.app import create_app as notifications_app
from services.policy.app import create_app as policy_app
from services.signaling.app import create_app as signaling_app

APPS = {
    "policy": policy_app,
    "signaling": signaling_app,
    "notifications": notifications_app,
    "media": media_app,
}
OPS = {"/healthz", "/readyz", "/metrics"}
DOCS = ["/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"]


def _paths(routes: list[Any]) -> list[str]:
    """The paths in the order a request is matched against them (included routers
    flattened in place)."""
    paths: list[str] = []
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            paths.extend(_paths(included.routes))
        elif isinstance(route, BaseRoute):
            paths.append(getattr(route, "path", ""))
    return paths


@pytest.mark.parametrize("service", sorted(APPS))
def test_the_services_routes_come_first_and_the_docs_last(service: str) -> None:
    app = APPS[service]()
    paths = _paths(app.router.routes)
    # what the service serves, then the operations routes, then the docs
    assert paths[-len(DOCS) :] == DOCS
    ops_at = [i for i, path in enumerate(paths) if path in OPS]
    own_at = [i for i, path in enumerate(paths) if path not in OPS and path not in DOCS]
    assert len(ops_at) == len(OPS) and own_at
    assert max(own_at) < min(ops_at)


@pytest.mark.parametrize("service", sorted(APPS))
async def test_the_docs_still_answer(service: str) -> None:
    app = APPS[service]()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        schema = (await client.get("/openapi.json")).json()
        assert schema["info"]["title"] == f"dmcall {service}"
        assert "/readyz" in schema["paths"] and len(schema["paths"]) > len(OPS)
        assert (await client.get("/docs")).status_code == 200
        assert (await client.get("/redoc")).status_code == 200
