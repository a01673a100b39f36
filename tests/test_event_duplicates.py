"""The bus publishes at least once: after a broker outage the same event (same ``event_id``)
can arrive twice (docs/architecture.md, "What the bus guarantees"). dmcall's own consumers
drop the copy. Here notifications, the consumer whose effects leave dmcall (webhooks):
a ``call_missed`` delivered twice makes one notification and one webhook push.

The other consumers have theirs: policy's verdict on a ``call_requested`` delivered twice
(tests/test_policy_events.py), signaling's duplicated verdicts
(tests/test_signaling_races.py), the bus itself (tests/test_bus.py)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from shared.contracts import CallMissed, CallRinging, MediaKind
from tests.conftest import auth
from tests.support.waiting import eventually
from tests.support.webhook_receiver import WebhookReceiver
from tools.stack import ServiceProcess

pytestmark = pytest.mark.e2e

FAST = {"NOTIFICATIONS_WEBHOOK_ALLOW_PRIVATE": "true", "NOTIFICATIONS_PUSH_TIMEOUT_S": "1"}


def kinds(receiver: WebhookReceiver, call_id: str) -> list[str]:
    pushed = [json.loads(r.body)["notification"] for r in receiver.received("/hook")]
    return [n["kind"] for n in pushed if n["call_id"] == call_id]


async def test_f16_call_missed_delivered_twice_makes_one_notification_and_one_webhook_push(
    spawn: Callable[..., ServiceProcess],
    bus_factory: Callable[..., Any],
    token: Callable[..., str],
    receiver: WebhookReceiver,
) -> None:
    first, second = spawn("notifications", **FAST), spawn("notifications", **FAST)
    bob = token("bob")
    async with httpx.AsyncClient(base_url=first.url) as http:
        device = await http.post(
            "/v1/devices", json={"kind": "webhook", "url": receiver.url("/hook")}, headers=auth(bob)
        )
        assert device.status_code == 201, device.text

    signaling = await bus_factory("test-signaling")
    call_id, sentinel = uuid.uuid4().hex, uuid.uuid4().hex
    deadline = datetime.now(UTC) + timedelta(minutes=10)
    for call in (call_id, sentinel):
        await signaling.publish(
            CallRinging(
                call_id=call,
                caller="alice",
                callee="bob",
                media=MediaKind.AUDIO,
                ring_deadline=deadline,
            )
        )
    missed = CallMissed(call_id=call_id, caller="alice", callee="bob", media=MediaKind.AUDIO)
    # The outage's duplicate: the same message (same event_id) reaches the queue twice,
    # where either instance may take either copy.
    await signaling.publish(missed)
    await signaling.publish(missed)
    await signaling.publish(
        CallMissed(call_id=sentinel, caller="alice", callee="bob", media=MediaKind.AUDIO)
    )
    # Its three pushes, then the sentinel's (published after the copies): a second push
    # of the copy would have come before it.
    await eventually(lambda: len(kinds(receiver, call_id)) >= 3)
    await eventually(lambda: "missed_call" in kinds(receiver, sentinel))

    assert sorted(kinds(receiver, call_id)) == ["incoming_call", "missed_call", "ring_stopped"]
    async with httpx.AsyncClient(base_url=second.url) as http:
        inbox = (await http.get("/v1/notifications?limit=100", headers=auth(bob))).json()
    assert sorted(n["kind"] for n in inbox if n["call_id"] == call_id) == [
        "incoming_call",
        "missed_call",
    ]
    # one push per notification: each delivery id once
    deliveries = [r.headers["x-dmcall-delivery"] for r in receiver.received("/hook")]
    assert len(deliveries) == len(set(deliveries)) == 6
