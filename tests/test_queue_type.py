"""``BUS_QUEUE_TYPE``: a deployment on a RabbitMQ cluster gets quorum queues for the
services' durable queues, set by configuration alone (deploy/k8s sets it)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from fastapi import FastAPI

from shared.bus import Delivery
from shared.contracts import CallDeclined
from shared.service import Runtime, create_service_app
from shared.settings import CommonSettings
from tests.conftest import Infra
from tests.support.waiting import eventually


async def _ignore(event: CallDeclined, delivery: Delivery) -> None:
    return None


@contextlib.asynccontextmanager
async def _subscribe(app: FastAPI, runtime: Runtime) -> AsyncIterator[None]:
    runtime.bus.subscribe("declines", {CallDeclined: _ignore})
    yield


def test_the_setting_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUS_QUEUE_TYPE", "quorum")
    assert CommonSettings().bus_queue_type == "quorum"
    monkeypatch.setenv("BUS_QUEUE_TYPE", "mirrored")
    with pytest.raises(ValueError, match="classic"):
        CommonSettings()
    monkeypatch.delenv("BUS_QUEUE_TYPE")
    assert CommonSettings().bus_queue_type == "classic"


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_the_service_queues_get_the_configured_type(
    infra: Infra, make_settings: Callable[..., CommonSettings], queue_type: str
) -> None:
    settings = make_settings(bus_queue_type=queue_type)
    app = create_service_app(service="qtype", settings=settings, routers=[], setup=_subscribe)
    async with app.router.lifespan_context(app):
        runtime: Any = app.state.runtime
        await asyncio.wait_for(runtime.bus.wait_ready(), 20)
        name = settings.prefixed("qtype.declines")

        def types() -> dict[str, str]:
            out = infra.rabbitmqctl("list_queues", "name", "type", "--no-table-headers")
            rows = [line.split() for line in out.splitlines() if line.strip()]
            return {row[0]: row[1] for row in rows if len(row) == 2}

        async def type_of_queue() -> str | None:
            return (await asyncio.to_thread(types)).get(name)

        assert await eventually(type_of_queue, timeout=20, step=0.5) == queue_type
        assert (await asyncio.to_thread(types))[f"{name}.dlq"] == "classic"
