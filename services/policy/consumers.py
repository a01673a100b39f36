"""Policy's event handlers: the platform's facts, and the verdict on every call_requested.

``facts`` (one instance of the service handles each event) applies the platform's
``user.updated``, ``follow.*``, ``contact.*``, ``block.*``, ``dm.sent`` and ``group.*``
events. Each write is ordered by the event's ``occurred_at`` (see store.py and
shared/groups.py), so redelivered and reordered facts end in the newest state; a group
post only ever adds (has posted at least once), so its order does not matter.

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

A group ``call_requested`` (``group`` set) gets one verdict the same way: ``call_rejected``
(the starter is not a member, or not premium) or ``call_authorized`` with ``ring``, the
invitees :func:`~services.policy.domain.decide_group` rings; why each other invitee is not
rung goes to the log (INFO) and the span, never into the event. Its parties (starter and
rung invitees) are recorded before it is published, and each ``call_participant_joined``
adds the joiner, so any of them may report another.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from opentelemetry import trace
from prometheus_client import Counter

from services.policy.domain import (
    GroupVerdict,
    Verdict,
    check_not_future,
    decide,
    decide_group,
)
from services.policy.settings import PolicySettings
from services.policy.store import PolicyStore, Relation
from shared.bus import Bus, Delivery, Handler, Scope
from shared.contracts import (
    BlockCreated,
    BlockDeleted,
    CallAuthorized,
    CallParticipantJoined,
    CallRejected,
    CallRequested,
    ContactAdded,
    ContactRemoved,
    DmSent,
    Event,
    FollowCreated,
    FollowDeleted,
    GroupMemberAdded,
    GroupMemberEvent,
    GroupMemberRemoved,
    GroupMessageSent,
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


def verdict_event(
    request: CallRequested, verdict: Verdict | GroupVerdict
) -> CallAuthorized | CallRejected:
    """The call's one verdict, naming the callee (1:1) or the group as the request did."""
    call = request.model_dump(include={"call_id", "caller", "callee", "group"})
    if verdict.allowed:
        ring = list(verdict.ring) if isinstance(verdict, GroupVerdict) else []
        return CallAuthorized(**call, media=request.media, ring=ring)
    assert verdict.reason is not None
    return CallRejected(**call, reason=verdict.reason, detail=verdict.detail)


def record_on_span(verdict: Verdict) -> None:
    span = trace.get_current_span()
    span.set_attribute("dmcall.policy.allowed", verdict.allowed)
    if verdict.detail is not None:
        span.set_attribute("dmcall.policy.reason", verdict.reason or "")
        span.set_attribute("dmcall.policy.detail", verdict.detail.value)


def ignored_as_stale(event: RelationEvent | GroupMemberEvent, what: str, whose: str) -> None:
    STALE_FACTS.labels(event.type.value).inc()
    log.info(
        "%s %s at %s is older than %s last change; ignored",
        event.type.value,
        what,
        event.occurred_at.isoformat(),
        whose,
    )


def register(bus: Bus, store: PolicyStore, settings: PolicySettings) -> None:
    policy = PolicyConsumers(store, bus, settings)
    facts: dict[type[Event], Handler] = {
        UserUpdated: policy.on_user_updated,
        DmSent: policy.on_dm_sent,
        GroupMemberAdded: policy.on_group_member,
        GroupMemberRemoved: policy.on_group_member,
        GroupMessageSent: policy.on_group_message,
    }
    facts.update(dict.fromkeys(RELATION_EVENTS, policy.on_relation))
    bus.subscribe(FACTS_CONSUMER, facts, scope=Scope.SERVICE)
    bus.subscribe(
        VERDICTS_CONSUMER,
        {
            CallRequested: policy.on_call_requested,
            CallParticipantJoined: policy.on_participant_joined,
        },
        scope=Scope.SERVICE,
    )


class PolicyConsumers:
    def __init__(self, store: PolicyStore, bus: Bus, settings: PolicySettings) -> None:
        self.store = store
        self.bus = bus
        self.settings = settings

    # ---------------------------------------------------------------- facts

    def _not_future(self, at: datetime) -> None:
        check_not_future(at, now=datetime.now(UTC), max_skew_s=self.settings.max_clock_skew_s)

    async def on_user_updated(self, event: UserUpdated, delivery: Delivery) -> None:
        self._not_future(event.occurred_at)
        applied = await self.store.update_user(
            event.user_id, premium=event.premium, verified=event.verified, at=event.occurred_at
        )
        if not applied:
            STALE_FACTS.labels(event.type.value).inc()
        log.debug("user.updated %s applied=%s", event.user_id, applied)

    async def on_relation(self, event: RelationEvent, delivery: Delivery) -> None:
        self._not_future(event.occurred_at)
        relation, present = RELATION_EVENTS[type(event)]
        change = await self.store.set_relation(
            relation, event.user_id, event.other_id, present=present, at=event.occurred_at
        )
        if not change.applied:
            ignored_as_stale(event, f"{event.user_id}->{event.other_id}", "the edge's")

    async def on_dm_sent(self, event: DmSent, delivery: Delivery) -> None:
        await self.store.record_dm(event.sender, event.recipient)

    async def on_group_member(self, event: GroupMemberEvent, delivery: Delivery) -> None:
        self._not_future(event.occurred_at)
        change = await self.store.set_group_member(
            event.group_id,
            event.user_id,
            present=isinstance(event, GroupMemberAdded),
            at=event.occurred_at,
        )
        if not change.applied:
            ignored_as_stale(event, f"{event.user_id} in {event.group_id}", "the member's")

    async def on_group_message(self, event: GroupMessageSent, delivery: Delivery) -> None:
        await self.store.record_group_post(event.group_id, event.sender)

    async def on_participant_joined(self, event: CallParticipantJoined, delivery: Delivery) -> None:
        # Only group calls: a joiner who was not rung becomes a party (may report, be
        # reported). A 1:1 call's parties are fixed by its verdict.
        if event.group is None and not await self.store.is_group_call(event.call_id):
            return
        await self.store.add_group_call_parties(
            event.call_id, [event.user], self.settings.call_retention_s
        )

    # ---------------------------------------------------------------- verdicts

    async def _judge(self, event: CallRequested) -> CallAuthorized | CallRejected:
        if event.group is None:
            assert event.callee is not None
            facts = await self.store.facts(event.caller, event.callee)
            return verdict_event(
                event, decide(facts, require_premium=self.settings.require_premium)
            )
        group_facts = await self.store.group_facts(event.group, event.caller, list(event.invitees))
        verdict = decide_group(
            group_facts,
            require_premium=self.settings.require_premium,
            max_participants=self.settings.group_call_max_participants,
        )
        if verdict.not_rung:
            span = trace.get_current_span()
            if span.is_recording():
                span.set_attribute(
                    "dmcall.policy.not_rung", [f"{u}:{why.value}" for u, why in verdict.not_rung]
                )
            log.info(
                "group call %s in %s by %s: not rung %s",
                event.call_id,
                event.group,
                event.caller,
                ", ".join(f"{u} ({why.value})" for u, why in verdict.not_rung),
            )
        return verdict_event(event, verdict)

    async def on_call_requested(self, event: CallRequested, delivery: Delivery) -> None:
        # The verdict and an authorized call's parties are recorded together, before
        # call_authorized goes out: a call rings only after this, so a party reporting it
        # right away finds it.
        stored = await self.store.claim_verdict(
            await self._judge(event),
            str(event.event_id),
            self.settings.verdict_ttl_s,
            retention_s=self.settings.call_retention_s,
        )
        decided = stored.event
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
                event.callee or f"group {event.group}",
                decided.reason.value,
                decided.detail.value if decided.detail else "-",
            )
        else:
            record_on_span(Verdict(True))
            log.info(
                "call %s %s -> %s authorized%s",
                event.call_id,
                event.caller,
                event.callee or f"group {event.group}",
                f", ringing {', '.join(decided.ring) or 'nobody'}" if decided.group else "",
            )
        await self.bus.publish(decided)
        await self.store.mark_verdict_published(
            event.call_id, self.settings.verdict_ttl_s, done_mark=delivery.done_mark
        )
        delivery.marked_done()
        if isinstance(decided, CallRejected):
            VERDICTS.labels("rejected", decided.detail.value if decided.detail else "").inc()
        else:
            VERDICTS.labels("authorized", "").inc()
