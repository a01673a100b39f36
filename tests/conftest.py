"""Fixtures shared by every test.

RabbitMQ and Redis are real servers: ``RABBITMQ_URL``/``REDIS_URL`` when set (a test
fails if they don't answer), else containers started with testcontainers where a Docker
engine answers, else the session fails saying what is missing. Nothing is skipped.

Tests share the servers and isolate themselves by a unique namespace per test (a prefix
on exchanges, queues and Redis keys), never by wiping the servers.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from redis.asyncio import Redis

from services.media.settings import MediaSettings
from shared import redis as shared_redis
from shared.auth import issue_token
from shared.bus import Bus
from shared.contracts import EventType
from shared.settings import CommonSettings
from tests.support import policy, signaling
from tests.support.redis_server import PrivateRedis
from tests.support.signaling import EventTap, event_tap
from tests.support.webhook_receiver import WebhookReceiver
from tools.infra import Endpoint
from tools.stack import ServiceProcess, Stack, remove_keys

S = TypeVar("S", bound=CommonSettings)

# The services default to production; the tests say explicitly that they are tests (this
# process, the settings they build, and every process they start).
os.environ.setdefault("DMCALL_ENV", "test")

# Queues of finished tests disappear by themselves after this long unused.
TEST_QUEUE_EXPIRES_MS = 10 * 60 * 1000


# Fixtures that start processes: a test using one is end to end, marked ``e2e`` (a module's
# ``pytestmark = pytest.mark.e2e``), so ``-m 'not e2e'`` is the fast lane.
PROCESS_FIXTURES = frozenset({"spawn", "service_stack", "worlds", "private_redis"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    unmarked = [
        item.nodeid
        for item in items
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("e2e") is None
    ]
    if unmarked:
        raise pytest.UsageError(f"these start processes, mark them e2e: {unmarked}")


@dataclass(frozen=True)
class Infra:
    rabbitmq_url: str
    redis_url: str
    rabbitmq_container: Any = None

    def rabbitmqctl(self, *args: str) -> str:
        """Run rabbitmqctl against the test broker (local binary, or inside its container)."""
        if self.rabbitmq_container is not None:
            code, out = self.rabbitmq_container.exec(["rabbitmqctl", *args])
            assert code == 0, out
            return out.decode() if isinstance(out, bytes) else str(out)
        if not shutil.which("rabbitmqctl"):
            pytest.fail("rabbitmqctl is needed to break broker connections in this test")
        result = subprocess.run(
            ["rabbitmqctl", "-q", *args], capture_output=True, text=True, check=True, timeout=60
        )
        return result.stdout


def _docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    return (
        subprocess.run(
            ["docker", "info"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False
        ).returncode
        == 0
    )


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    rabbit_url = os.environ.get("RABBITMQ_URL")
    redis_url = os.environ.get("REDIS_URL")
    if rabbit_url or redis_url:
        if not (rabbit_url and redis_url):
            pytest.fail("set both RABBITMQ_URL and REDIS_URL, or neither")
        for endpoint in (Endpoint("RabbitMQ", rabbit_url), Endpoint("Redis", redis_url)):
            if not endpoint.answers(timeout=3):
                pytest.fail(f"{endpoint.name} does not answer at {endpoint.url}")
        yield Infra(rabbit_url, redis_url)
        return
    if not _docker_answers():
        pytest.fail(
            "RabbitMQ and Redis are needed: set RABBITMQ_URL and REDIS_URL, or run "
            "`make test` (it starts local servers), or have a Docker engine for testcontainers"
        )
    from testcontainers.rabbitmq import RabbitMqContainer
    from testcontainers.redis import RedisContainer

    with RabbitMqContainer("rabbitmq:3.13") as rabbit, RedisContainer("redis:7") as red:
        rurl = (
            f"amqp://guest:guest@{rabbit.get_container_host_ip()}:{rabbit.get_exposed_port(5672)}/"
        )
        redurl = f"redis://{red.get_container_host_ip()}:{red.get_exposed_port(6379)}/0"
        os.environ["RABBITMQ_URL"], os.environ["REDIS_URL"] = rurl, redurl
        yield Infra(rurl, redurl, rabbitmq_container=rabbit)


@pytest.fixture
def namespace(infra: Infra) -> Iterator[str]:
    """A unique prefix for this test's exchanges, queues and Redis keys; keys removed after."""
    ns = f"t{uuid.uuid4().hex[:12]}"
    yield ns
    remove_keys(infra.redis_url, ns)


@pytest.fixture
def make_settings(infra: Infra, namespace: str) -> Callable[..., Any]:
    """``make_settings(PolicySettings, require_premium=False)``: settings for this test."""

    def build(cls: type[S] = CommonSettings, **overrides: Any) -> S:  # type: ignore[assignment]
        values: dict[str, Any] = {
            "environment": "test",
            "namespace": namespace,
            "rabbitmq_url": infra.rabbitmq_url,
            "redis_url": infra.redis_url,
            "bus_queue_expires_ms": TEST_QUEUE_EXPIRES_MS,
            "bus_retry_delay_ms": 100,
        }
        values.update(overrides)
        return cls(**values)

    return build


@pytest.fixture
def settings(make_settings: Callable[..., CommonSettings]) -> CommonSettings:
    return make_settings()


@pytest.fixture
def service_env(infra: Infra, namespace: str) -> dict[str, str]:
    """Environment for a service process that belongs to this test."""
    return {
        "DMCALL_ENV": "test",
        "DMCALL_NAMESPACE": namespace,
        "RABBITMQ_URL": infra.rabbitmq_url,
        "REDIS_URL": infra.redis_url,
        "BUS_QUEUE_EXPIRES_MS": str(TEST_QUEUE_EXPIRES_MS),
        "BUS_RETRY_DELAY_MS": "100",
        "LOG_LEVEL": "INFO",
    }


@pytest.fixture
def service_stack(service_env: dict[str, str], tmp_path: Path) -> Iterator[Stack]:
    """This test's service processes (its namespace, logs in its tmp_path), stopped after."""
    stack = Stack(service_env, tmp_path)
    yield stack
    stack.stop()


@pytest.fixture
def spawn(service_stack: Stack) -> Callable[..., ServiceProcess]:
    """Start a real service process: ``spawn("policy", POLICY_REQUIRE_PREMIUM="false")``,
    ready unless ``wait=False``."""

    def start(service: str, *, wait: bool = True, **env: str) -> ServiceProcess:
        return service_stack.start(service, wait=wait, **env)

    return start


@pytest.fixture
async def redis_client(infra: Infra) -> AsyncIterator[Redis]:
    client = Redis.from_url(infra.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def token(settings: CommonSettings) -> Callable[..., str]:
    """``token("alice")`` or ``token("svc", scope="platform")``: a valid development token."""

    def mint(user: str, *, scope: str | None = None, ttl_s: int = 3600) -> str:
        return issue_token(settings, user, scope=scope, ttl_s=ttl_s)

    return mint


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def bus_factory(settings: CommonSettings) -> AsyncIterator[Callable[..., Any]]:
    """``await bus_factory("svc", name={Model: handler})``: a started Bus, closed after."""
    made: list[tuple[Bus, Redis]] = []

    async def make(service: str = "svc", s: CommonSettings = settings, **subs: Any) -> Bus:
        redis = shared_redis.connect(s, name=f"test-{service}")
        bus = Bus(s, redis, service)
        for name, handlers in subs.items():
            bus.subscribe(name, handlers)
        made.append((bus, redis))
        await asyncio.wait_for(bus.start(), 15)
        return bus

    yield make
    for bus, redis in made:
        await bus.close()
        await redis.aclose()


@pytest.fixture
async def publish(bus_factory: Callable[..., Any]) -> Callable[..., Any]:
    """``await publish(event)``: publishes on this test's broker as signaling would."""
    bus = await bus_factory("test-signaling")
    return bus.publish  # type: ignore[no-any-return]


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    """A real local webhook receiver (tests/support/webhook_receiver.py)."""
    server = WebhookReceiver().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def k8s_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/k8s with the prod secrets filled in from their templates."""
    tree = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(Path(__file__).resolve().parent.parent / "deploy" / "k8s", tree)
    for example in (tree / "overlays" / "prod" / "secrets").glob("*.example"):
        shutil.copy(example, example.with_suffix(""))
    return tree


worlds = pytest.fixture(signaling.worlds)
in_process = pytest.fixture(signaling.in_process)
rig = pytest.fixture(policy.policy_rig, name="rig")
seeded_policy = pytest.fixture(policy.seeded_policy)


@pytest.fixture
async def tap(infra: Infra, namespace: str) -> AsyncIterator[EventTap]:
    """Every copy of every event published on this test's ``calls`` exchange, as published."""
    async with event_tap(infra.rabbitmq_url, namespace, tuple(EventType)) as events:
        yield events


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for absolute URLs, closed after."""
    async with httpx.AsyncClient(timeout=20) as client:
        yield client


@pytest.fixture
def media_settings(
    make_settings: Callable[..., Any], request: pytest.FixtureRequest
) -> MediaSettings:
    """The settings of the media node a module starts: its id is the module's ``NODE``."""
    return make_settings(MediaSettings, node_id=request.module.NODE)
