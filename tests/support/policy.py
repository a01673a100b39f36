"""What the policy tests over the bus share: :class:`PolicyRig` (spawn policy, make buses,
mint tokens, wait until policy handled an event) and a policy the demo seed ran against.

A test module makes them fixtures: ``rig = pytest.fixture(policy_rig, name="rig")``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis

from shared.bus import Bus
from shared.contracts import Event
from tests.support.policy_calls import handled, judged_call
from tests.support.waiting import eventually
from tools.stack import ServiceProcess

Token = Callable[..., str]


@dataclass(frozen=True, slots=True)
class PolicyRig:
    """The fixtures a policy test over the bus uses, together."""

    spawn: Callable[..., ServiceProcess]
    bus: Callable[..., Any]
    """``bus_factory``: ``await rig.bus(service, **subscriptions)``."""
    redis: Redis
    namespace: str
    token: Token

    def key(self, *parts: str) -> str:
        """A Redis key of this test's namespace: ``key("policy", "call", call_id)``."""
        return ":".join(("dmcall", self.namespace, *parts))

    async def handled(self, consumer: str, *events: Event) -> None:
        """Wait until policy's ``consumer`` has finished each event."""
        await eventually(handled(self.redis, self.namespace, consumer, *events))

    async def judged_call(self, bus: Bus, caller: str, callee: str) -> str:
        """A call caller -> callee policy decided; its call id."""
        return await judged_call(bus, self.redis, self.namespace, caller, callee)


def policy_rig(
    spawn: Callable[..., ServiceProcess],
    bus_factory: Callable[..., Any],
    redis_client: Redis,
    namespace: str,
    token: Token,
) -> PolicyRig:
    return PolicyRig(spawn, bus_factory, redis_client, namespace, token)


def seeded_policy(
    spawn: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> ServiceProcess:
    """A policy process the demo seed ran against twice (running it again must be safe)."""
    from tools import seed

    proc = spawn("policy")
    for name, value in service_env.items():
        monkeypatch.setenv(name, value)
    seed.seed(proc.url)
    seed.seed(proc.url)
    return proc
