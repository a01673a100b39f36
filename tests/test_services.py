"""The four service processes: they start, report health and readiness, serve metrics and
OpenAPI, answer bad requests with JSON errors, and ride out a Redis restart."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import httpx
import pytest

from tests.support.redis_server import PrivateRedis
from tools.stack import ServiceProcess, free_port

pytestmark = pytest.mark.e2e

SERVICES = ("signaling", "policy", "notifications", "media")


def poll_status(url: str, expected: int, timeout: float = 20.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=2.0)
            if response.status_code == expected:
                return response
            last = response.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer {expected} within {timeout}s (last: {last})")


@pytest.mark.parametrize("service", SERVICES)
def test_service_starts_and_serves_the_operational_endpoints(
    spawn: Callable[..., ServiceProcess], service: str
) -> None:
    proc = spawn(service)
    assert proc.proc is not None
    assert httpx.get(f"{proc.url}/healthz").json() == {
        "status": "ok",
        "service": service,
        "pid": proc.proc.pid,
    }
    ready = httpx.get(f"{proc.url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"rabbitmq": True, "redis": True}
    openapi = httpx.get(f"{proc.url}/openapi.json").json()
    assert openapi["info"]["title"] == f"dmcall {service}"
    assert "/readyz" in openapi["paths"]
    missing = httpx.get(f"{proc.url}/no/such/path")
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"
    metrics = httpx.get(f"{proc.url}/metrics")
    assert metrics.status_code == 200
    assert f'dmcall_http_requests_total{{method="GET",route="/healthz",service="{service}"' in (
        metrics.text
    )
    # SIGUSR1 logs its asyncio tasks and where each waits (for one that will not stop);
    # without the handler the signal's default would end the process
    assert proc.log_path is not None
    proc.proc.send_signal(signal.SIGUSR1)

    def tasks_logged() -> bool:
        text = proc.log_path.read_text(errors="replace") if proc.log_path else ""
        return "shared.service" in text and "task Task-" in text

    deadline = time.monotonic() + 10
    while not tasks_logged():
        assert time.monotonic() < deadline, "no task listing in the log after SIGUSR1"
        time.sleep(0.05)
    assert proc.proc.poll() is None
    assert httpx.get(f"{proc.url}/healthz").status_code == 200


def test_a_huge_body_is_refused_with_413(spawn: Callable[..., ServiceProcess]) -> None:
    proc = spawn("policy", MAX_BODY_BYTES="2048")
    response = httpx.post(f"{proc.url}/healthz", content=b"x" * 10_000)
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"


def test_not_ready_until_redis_answers(spawn: Callable[..., ServiceProcess]) -> None:
    dead_port = free_port()
    proc = spawn("notifications", wait=False, REDIS_URL=f"redis://127.0.0.1:{dead_port}/0")
    poll_status(f"{proc.url}/healthz", 200)
    response = poll_status(f"{proc.url}/readyz", 503)
    assert response.json()["checks"]["redis"] is False


def test_not_ready_until_rabbitmq_answers(spawn: Callable[..., ServiceProcess]) -> None:
    dead_port = free_port()
    proc = spawn("policy", wait=False, RABBITMQ_URL=f"amqp://guest:guest@127.0.0.1:{dead_port}/")
    poll_status(f"{proc.url}/healthz", 200)
    response = poll_status(f"{proc.url}/readyz", 503)
    assert response.json()["checks"] == {"rabbitmq": False, "redis": True}


@pytest.mark.parametrize("service", SERVICES)
def test_services_carry_on_after_redis_restarts(
    spawn: Callable[..., ServiceProcess], private_redis: PrivateRedis, service: str
) -> None:
    proc = spawn(service, REDIS_URL=private_redis.url)
    private_redis.stop()
    assert poll_status(f"{proc.url}/readyz", 503).json()["checks"]["redis"] is False
    private_redis.start()
    poll_status(f"{proc.url}/readyz", 200)
    assert proc.proc is not None and proc.proc.poll() is None  # never restarted


def test_free_ports_are_never_handed_out_twice_and_stay_below_the_ephemeral_range() -> None:
    from tools.stack import _ephemeral_range

    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    low, _ = _ephemeral_range()
    assert all(port < low for port in ports)


def test_services_collect_garbage_less_often_and_record_every_pause(
    spawn: Callable[..., ServiceProcess],
) -> None:
    import gc

    from prometheus_client import REGISTRY

    from shared import gc_tuning

    before = gc.get_threshold()
    try:
        gc_tuning.tune()
        assert gc.get_threshold() == gc_tuning.THRESHOLDS
        assert gc.get_freeze_count() > 0
        gc_tuning.tune()  # twice: still one callback
        assert gc.callbacks.count(gc_tuning._on_gc) == 1

        def full_collections() -> float:
            value = REGISTRY.get_sample_value("dmcall_gc_pause_seconds_count", {"generation": "2"})
            return value or 0.0

        counted = full_collections()
        gc.collect()
        assert full_collections() == counted + 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    # and a service exposes the histogram
    proc = spawn("policy")
    assert "dmcall_gc_pause_seconds" in httpx.get(f"{proc.url}/metrics").text
