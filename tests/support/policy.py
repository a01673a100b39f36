"""What the policy tests over the bus share: :class:`PolicyRig` (spawn policy, make buses,
mint tokens, publish a call policy judges, wait until policy handled an event), a policy the
demo seed ran against (both fixtures in tests/conftest.py), and the verdicts an event tap saw.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis

from shared.bus import Bus
from shared.contracts import CallRequested, Event, EventType, MediaKind
from tests.support.signaling import EventTap
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
        """Wait until policy's ``consumer`` has finished each event (the bus's done mark)."""
        keys = [self.key("bus", "seen", f"policy.{consumer}", str(e.event_id)) for e in events]

        async def done() -> bool:
            return all(v == b"done" for v in await self.redis.mget(keys))

        await eventually(done)

    async def judged_call(self, bus: Bus, caller: str, callee: str) -> str:
        """Publish ``call_requested`` caller -> callee as signaling would; its call id once
        policy decided it."""
        event = CallRequested(
            call_id=uuid.uuid4().hex, caller=caller, callee=callee, media=MediaKind.AUDIO
        )
        await bus.publish(event)
        await self.handled("verdicts", event)
        return event.call_id


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


def verdicts_in(tap: EventTap) -> list[dict[str, Any]]:
    """Every verdict on ``tap``, each copy published (the bus's consumers drop copies)."""
    kinds = (EventType.CALL_AUTHORIZED.value, EventType.CALL_REJECTED.value)
    return [m for m in tap.messages if m["type"] in kinds]
