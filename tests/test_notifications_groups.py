"""A group call's notifications through the real broker, Redis and a notifications
process: each invitee's incoming and missed call name the group in the inbox and in the
webhook payload; the group call's end makes nothing more."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from shared.contracts import CallEnded, CallMissed, CallRinging, EndReason, MediaKind
from tests.conftest import auth
from tests.support.notifications import Spawn
from tests.support.waiting import eventually
from tests.support.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.e2e


async def test_each_invitee_is_told_of_the_group_call_and_of_missing_it(
    spawn: Spawn,
    bus_factory: Callable[..., Any],
    token: Callable[..., str],
    receiver: WebhookReceiver,
) -> None:
    proc = spawn("notifications", NOTIFICATIONS_WEBHOOK_ALLOW_PRIVATE="true")
    signaling = await bus_factory("test-signaling")
    call_id = uuid.uuid4().hex
    group = {"call_id": call_id, "caller": "alice", "group": "friends"}
    deadline = datetime.now(UTC) + timedelta(minutes=5)
    async with httpx.AsyncClient(base_url=proc.url) as http:
        device = await http.post(
            "/v1/devices",
            json={"kind": "webhook", "url": receiver.url("/erin")},
            headers=auth(token("erin")),
        )
        assert device.status_code == 201, device.text
        for invitee in ("bob", "erin"):
            await signaling.publish(
                CallRinging(callee=invitee, media=MediaKind.AUDIO, ring_deadline=deadline, **group)
            )

        async def inbox(user: str, count: int) -> list[dict[str, Any]] | None:
            response = await http.get("/v1/notifications", headers=auth(token(user)))
            items = list(response.json())
            return items if len(items) >= count else None

        # Events are not ordered across deliveries: a miss handled before its ring makes
        # no incoming call (by design), so the ring is in before the miss is published.
        await eventually(lambda: inbox("erin", 1))
        await signaling.publish(CallMissed(callee="erin", media=MediaKind.AUDIO, **group))
        ended = CallEnded(reason=EndReason.USER_HANGUP, duration_s=4, **group)
        await signaling.publish(ended)
        erin = await eventually(lambda: inbox("erin", 2))
        assert [(i["kind"], i["group"], i["from"]) for i in erin] == [
            ("missed_call", "friends", "alice"),
            ("incoming_call", "friends", "alice"),
        ]
        [bob] = await eventually(lambda: inbox("bob", 1))
        assert (bob["kind"], bob["group"], bob["call_id"]) == ("incoming_call", "friends", call_id)
        starter = await http.get("/v1/notifications", headers=auth(token("alice")))
        assert starter.json() == []  # the starter is not notified

        def kinds() -> list[str] | None:
            got = [json.loads(r.body)["notification"] for r in receiver.received("/erin")]
            return [n["kind"] for n in got] if len(got) >= 3 else None

        assert sorted(await eventually(kinds)) == ["incoming_call", "missed_call", "ring_stopped"]
        payloads = {
            n["kind"]: n
            for n in (json.loads(r.body)["notification"] for r in receiver.received("/erin"))
        }
        assert payloads["incoming_call"]["group"] == "friends"
        assert payloads["missed_call"]["group"] == "friends"
        assert "group" not in payloads["ring_stopped"]
