"""Policy's event handlers: the platform's facts, and the verdict on every call_requested.

``facts`` (one instance of the service handles each event) applies the platform's
``user.updated``, ``follow.*``, ``contact.*``, ``block.*`` and ``dm.sent`` events. Each
write is ordered by the event's ``occurred_at`` (see store.py), so redelivered and
reordered facts end in the newest state.

``verdicts`` decides each ``call_requested`` on the facts as they are when it is handled
and publishes ``call_authorized`` or ``call_rejected`` in the same trace (the bus runs
the handler inside the consumer span that continues the publisher's). Exactly one
verdict per call: the first decision is recorded under the call id, with the id of the
``call_requested`` that made it, before it is published. A second ``call_requested`` for
the same call (another event id) does nothing; a redelivery of the first (the process
died before the bus marked it done) republishes the same recorded event, same
``event_id``, only if the broker never confirmed it.

An authorized call's two parties are recorded (``policy:call:<call_id>``) before its
``call_authorized`` is published: ``POST /v1/reports`` checks a report against them, and
signaling rings only on the verdict, so no party can see a call before it is recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from opentelemetry import trace
from prometheus_client import Counter

from services.policy.domain import Verdict, decide
from services.policy.settings import PolicySettings
from services.policy.store import PolicyStore, Relation
from shared.bus import Bus, Delivery
from shared.contracts import (
    BlockCreated,
    BlockDeleted,
    CallAuthorized,
    CallRejected,
    CallRequested,
    ContactAdded,
    ContactRemoved,
    DmSent,
    Event,
    FollowCreated,
    FollowDeleted,
    RelationEvent,
    UserUpdated,
)

log = logging.getLogger(__name__)

VERDICTS = Counter(
    "dmcall_policy_verdicts_total",
    "Verdicts published on call_requested, by outcome and detailed reason",
    ["outcome", "detail"],
)
STALE_FACTS = Counter(
    "dmcall_policy_stale_facts_total",
    "Platform fact events ignored because a newer change was already recorded",
    ["event_type"],
)

FACTS_CONSUMER = "facts"
VERDICTS_CONSUMER = "verdicts"

# event model -> (relation, present after it)
RELATION_EVENTS: dict[type[RelationEvent], tuple[Relation, bool]] = {
    FollowCreated: (Relation.FOLLOWING, True),
    FollowDeleted: (Relation.FOLLOWING, False),
    ContactAdded: (Relation.CONTACTS, True),
    ContactRemoved: (Relation.CONTACTS, False),
    BlockCreated: (Relation.BLOCKS, True),
    BlockDeleted: (Relation.BLOCKS, False),
}


class FactFromTheFuture(ValueError):
    """A fact dated beyond the allowed clock skew: refused rather than frozen in place."""


def check_not_future(at: datetime, settings: PolicySettings) -> None:
    limit = datetime.now(UTC) + timedelta(seconds=settings.max_clock_skew_s)
    if at > limit:
        raise FactFromTheFuture(
            f"occurred_at {at.isoformat()} is more than {settings.max_clock_skew_s}s in the future"
        )


def verdict_event(request: CallRequested, verdict: Verdict) -> CallAuthorized | CallRejected:
    if verdict.allowed:
        return CallAuthorized(
            call_id=request.call_id,
            caller=request.caller,
            callee=request.callee,
            media=request.media,
        )
    assert verdict.reason is not None
    return CallRejected(
        call_id=request.call_id,
        caller=request.caller,
        callee=request.callee,
        reason=verdict.reason,
        detail=verdict.detail,
    )


def record_on_span(verdict: Verdict) -> None:
    span = trace.get_current_span()
    span.set_attribute("dmcall.policy.allowed", verdict.allowed)
    if verdict.detail is not None:
        span.set_attribute("dmcall.policy.reason", verdict.reason or "")
        span.set_attribute("dmcall.policy.detail", verdict.detail.value)


class PolicyConsumers:
    def __init__(self, store: PolicyStore, bus: Bus, settings: PolicySettings) -> None:
        self.store = store
        self.bus = bus
        self.settings = settings

    def register(self) -> None:
        handlers: dict[type[Event], Callable[[Any, Delivery], Awaitable[None]]] = {
            UserUpdated: self.on_user_updated,
            DmSent: self.on_dm_sent,
        }
        for model in RELATION_EVENTS:
            handlers[model] = self.on_relation
        self.bus.subscribe(FACTS_CONSUMER, handlers)
        self.bus.subscribe(VERDICTS_CONSUMER, {CallRequested: self.on_call_requested})

    # ---------------------------------------------------------------- facts

    async def on_user_updated(self, event: UserUpdated, delivery: Delivery) -> None:
        check_not_future(event.occurred_at, self.settings)
        applied = await self.store.update_user(
            event.user_id, premium=event.premium, verified=event.verified, at=event.occurred_at
        )
        if not applied:
            STALE_FACTS.labels(event.type.value).inc()
        log.debug("user.updated %s applied=%s", event.user_id, applied)

    async def on_relation(self, event: RelationEvent, delivery: Delivery) -> None:
        check_not_future(event.occurred_at, self.settings)
        relation, present = RELATION_EVENTS[type(event)]
        change = await self.store.set_relation(
            relation, event.user_id, event.other_id, present=present, at=event.occurred_at
        )
        if not change.applied:
            STALE_FACTS.labels(event.type.value).inc()
            log.info(
                "%s %s->%s at %s is older than the edge's last change; ignored",
                event.type.value,
                event.user_id,
                event.other_id,
                event.occurred_at.isoformat(),
            )

    async def on_dm_sent(self, event: DmSent, delivery: Delivery) -> None:
        await self.store.record_dm(event.sender, event.recipient)

    # ---------------------------------------------------------------- verdicts

    async def on_call_requested(self, event: CallRequested, delivery: Delivery) -> None:
        if event.callee is None:
            log.warning(
                "group call %s: not decided yet (group calls are being built)", event.call_id
            )
            return
        facts = await self.store.facts(event.caller, event.callee)
        verdict = decide(facts, require_premium=self.settings.require_premium)
        stored = await self.store.claim_verdict(
            verdict_event(event, verdict), str(event.event_id), self.settings.verdict_ttl_s
        )
        decided = stored.event
        if isinstance(decided, CallAuthorized):
            # Before call_authorized goes out: a call can ring only after this, so a party
            # reporting it right away finds it (idempotent, for the redelivery too).
            await self.store.record_call(decided, self.settings.call_retention_s)
        if stored.published or not stored.owned:
            # Another call_requested for this call decided it; that one's delivery publishes.
            log.info("call %s already judged (%s); nothing to publish", event.call_id, decided.type)
            return
        if isinstance(decided, CallRejected):
            record_on_span(Verdict(False, decided.reason, decided.detail))
            log.info(
                "call %s %s -> %s rejected: %s (detail %s)",
                event.call_id,
                event.caller,
                event.callee,
                decided.reason.value,
                decided.detail.value if decided.detail else "-",
            )
        else:
            record_on_span(Verdict(True))
            log.info("call %s %s -> %s authorized", event.call_id, event.caller, event.callee)
        await self.bus.publish(decided)
        await self.store.mark_verdict_published(event.call_id, self.settings.verdict_ttl_s)
        if isinstance(decided, CallRejected):
            VERDICTS.labels("rejected", decided.detail.value if decided.detail else "").inc()
        else:
            VERDICTS.labels("authorized", "").inc()
