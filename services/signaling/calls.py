"""The call operations. Each attempt reads the call and what its decision needs (live
calls for busy and glare, group membership, a media node), lets a pure decision
(decisions.py, over the tables of domain.py) say what changes, and commits that
atomically (a version check in one Redis script); on a conflict the whole attempt runs
again. After the commit: the devices are told, and the events the commit put in the
outbox are published in the background (the outbox already guarantees them, so neither a
request nor a consumer waits on the broker).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prometheus_client import Counter, Histogram

from services.signaling import decisions as d
from services.signaling.decisions import (
    Again,
    BadSignal,
    Granted,
    Moved,
    NoMediaNode,
    NotFound,
    Notice,
    Outcome,
    Step,
)
from services.signaling.domain import (
    IN_CALL_STATES,
    AudioState,
    Call,
    CallAction,
    CallFull,
    CallState,
    IllegalTransition,
    ParticipantState,
    VideoState,
)
from services.signaling.presence import Hub, Push
from services.signaling.settings import SignalingSettings
from services.signaling.store import (
    CallStore,
    Commit,
    Conflict,
    GroupCallInProgress,
    IdempotentReplay,
)
from services.signaling.turn import IceServers
from shared.auth import MediaGrant, issue_media_token
from shared.bus import Bus, Delivery
from shared.clock import utcnow
from shared.contracts import (
    CallAuthorized,
    CallMediaConnected,
    CallMediaFailed,
    CallMediaPeer,
    CallRejected,
    EndReason,
    Event,
    MediaKind,
    MediaMoveReason,
    MediaNodeDraining,
)
from shared.groups import GroupDirectory
from shared.ids import new_call_id
from shared.media_registry import MediaNode, MediaRegistry

log = logging.getLogger(__name__)

__all__ = [
    "BadCursor",
    "BadSignal",
    "CallFull",
    "CallService",
    "GroupCallInProgress",
    "MediaOffer",
    "NoMediaNode",
    "NotFound",
    "PlacementInProgress",
    "RateLimited",
    "SignalRateLimited",
]

MAX_COMMIT_ATTEMPTS = 20
PUBLISH_DRAIN_S = 5.0
"""At shutdown, how long background publishes may finish (the rest: the outbox relay's)."""
REPLAY_WAIT_S = 2.0
"""How long a retry waits for the concurrent placement holding its Idempotency-Key."""

CURSOR_RE = re.compile(r"^[0-9a-f]{1,64}$")

MEDIA_MOVES = Counter(
    "dmcall_signaling_media_moves_total",
    "Calls whose media moved to another node, by why",
    ["reason"],
)
MOVE_ATTEMPTS = 3
"""How often ``POST /media`` moves a call whose node is gone before answering 503."""

MISSED_LATENESS = Histogram(
    "dmcall_signaling_missed_lateness_seconds",
    "How long after its ring deadline a call was marked missed",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5),
)
TIME_TO_RING = Histogram(
    "dmcall_signaling_time_to_ring_seconds",
    "From a call's placing to its ring pushed to the callee's devices (policy's verdict in)",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

T = TypeVar("T")
R = TypeVar("R")


class RateLimited(Exception):
    def __init__(self, retry_after_ms: int) -> None:
        super().__init__(f"retry after {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms


class BadCursor(ValueError):
    pass


class PlacementInProgress(Exception):
    """Another request with the same Idempotency-Key is placing the call right now."""


class SignalRateLimited(Exception):
    """The user sent more ``call.signal`` frames for this call than allowed."""


@dataclass(frozen=True, slots=True)
class MediaOffer:
    """One party's media hand-off: where to send the SDP offer, the token it goes with,
    and the ICE servers (TURN credentials minted for that party) to gather through."""

    call_id: str
    state: Any
    media_url: str
    media_token: str
    node_id: str
    ice_servers: list[dict[str, Any]] = field(default_factory=list)

    def media_fields(self) -> dict[str, Any]:
        return {
            "media_url": self.media_url,
            "media_token": self.media_token,
            "node_id": self.node_id,
            "ice_servers": self.ice_servers,
        }

    def public(self) -> dict[str, Any]:
        return {"call_id": self.call_id, "state": self.state.value, **self.media_fields()}


@dataclass(frozen=True, slots=True)
class Ran:
    """A committed step, the call as committed, and the grants its notices carried."""

    step: Step[Any]
    call: Call
    minted: dict[tuple[str, str], MediaOffer]


async def _nothing(call: Call) -> None:
    return None


class CallService:
    def __init__(
        self,
        settings: SignalingSettings,
        store: CallStore,
        hub: Hub,
        bus: Bus,
        registry: MediaRegistry,
        groups: GroupDirectory | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.hub = hub
        self.bus = bus
        self.registry = registry
        self.groups = groups or GroupDirectory(store.redis, settings)
        self.ice = IceServers.from_settings(settings)
        self._publishing: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Let background publishes finish a moment; what is left, the outbox relay of any
        instance publishes."""
        if self._publishing:
            await asyncio.wait(set(self._publishing), timeout=PUBLISH_DRAIN_S)
        for task in list(self._publishing):
            task.cancel()
        await asyncio.gather(*self._publishing, return_exceptions=True)

    # ------------------------------------------------------------------ the machinery

    async def _run(
        self,
        call_id: str,
        decide: Callable[[Call, Any, Any], Step[T]],
        read: Callable[[Call], Awaitable[Any]] = _nothing,
        delivery: Delivery | None = None,
    ) -> Ran:
        """Each attempt: read the call and what the decision needs, decide (pure), commit
        with a version check (and the event's done mark, for a ``delivery``); on a
        conflict, all again. Returns the step, the call as committed (the last written
        version of ``call_id``, else as read), the grants."""
        done = delivery.done_mark if delivery is not None else None
        for _ in range(MAX_COMMIT_ATTEMPTS):
            call = await self.store.get(call_id)
            if call is None:
                raise NotFound(call_id)
            reads = await read(call)
            step = decide(call, utcnow(), reads)
            presence = None
            if step.changes:
                users = sorted({notice.user for notice in step.notices})
                try:
                    presence = await self.store.commit(
                        self._commit_of(step, done), devices_of=users
                    )
                except Conflict:
                    continue
            final = next((w.after for w in step.writes if w.after.call_id == call_id), call)
            calls = {call_id: final, **{w.after.call_id: w.after for w in step.writes}}
            minted = await self._after(step, calls, presence)
            return Ran(step, final, minted)
        raise RuntimeError(f"call {call_id}: too many concurrent changes")

    def _commit_of(self, step: Step[Any], done: tuple[str, int] | None = None) -> Commit:
        commit = Commit(events=list(step.events), done=done)
        for write in step.writes:
            self.store.stage(commit, write.before, write.after)
        self.store.check(commit, step.checks)
        return commit

    async def _after(
        self,
        step: Step[Any],
        calls: dict[str, Call],
        presence: Mapping[str, Mapping[str, str]] | None,
    ) -> dict[tuple[str, str], MediaOffer]:
        # Both only after the commit; neither the devices nor the caller wait for the
        # broker. The commit stands whatever happens here: an unpublished event stays in
        # the outbox for the relay, and a lost push is read back through the ring state.
        # ``presence``: the notified users' devices, read by the commit.
        self.publish_soon(step.events)
        pushes, minted = self.pushes(step.notices, calls)
        try:
            await self.hub.deliver(pushes, presence)
        except Exception as exc:
            log.warning("after-commit pushes failed: %r", exc)
        return minted

    def pushes(
        self, notices: Sequence[Notice], calls: dict[str, Call]
    ) -> tuple[list[Push], dict[tuple[str, str], MediaOffer]]:
        """The notices as pushes, each grant minted (once per user and call)."""
        minted: dict[tuple[str, str], MediaOffer] = {}
        out = []
        for notice in notices:
            message = notice.message
            if notice.grant:
                call_id = str(message["call_id"])
                call = calls[call_id]
                offer = minted.get((call_id, notice.user))
                if offer is None:
                    offer = minted[(call_id, notice.user)] = self._offer(call, notice.user)
                message = {**message, **offer.media_fields()}
            out.append(
                Push(
                    notice.user,
                    message,
                    devices=notice.devices,
                    except_devices=notice.except_devices,
                    newest=notice.newest,
                )
            )
        return out, minted

    def publish_soon(self, events: Sequence[Event]) -> None:
        """:meth:`publish` in the background (kept, and drained by :meth:`close`)."""
        if not events:
            return
        task = asyncio.get_running_loop().create_task(self.publish(list(events)))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def publish(self, events: Sequence[Event]) -> None:
        """Publish committed events, then clear them from the outbox (else a relay will
        publish them again, which consumers drop as duplicates)."""
        done: list[str] = []
        for event in events:
            try:
                await self.bus.publish(event)
            except Exception as exc:  # BusUnavailable or a broken channel
                log.warning("could not publish %s now (%s); the outbox relay will", event.type, exc)
                continue
            done.append(str(event.event_id))
        self.store.outbox_done_soon(done)

    def _offer(self, call: Call, user: str) -> MediaOffer:
        assert call.media_node and call.media_url
        return self._mint(call, user, call.media_node, call.media_url)

    def _mint(self, call: Call, user: str, node_id: str, url: str) -> MediaOffer:
        token = issue_media_token(
            self.settings,
            # while a moved call's rejoin deadline runs, its new room waits that long
            MediaGrant(
                call_id=call.call_id,
                user_id=user,
                node_id=node_id,
                moved=call.rejoin_deadline is not None,
                group=call.group,  # a group call's room admits up to its maximum
            ),
            ttl_s=self.settings.media_token_ttl_s,
        )
        return MediaOffer(call.call_id, call.state, url, token, node_id, self.ice.for_user(user))

    def ice_servers(self, user: str) -> list[dict[str, Any]]:
        """The ICE servers for ``user``'s peer connections, TURN credentials fresh."""
        return self.ice.for_user(user)

    async def _pick_if(self, needed: bool, avoid: str | None = None) -> MediaNode | None:
        if not needed:
            return None
        return await self.registry.pick(avoid=avoid) if avoid else await self.registry.pick()

    # ------------------------------------------------------------------ placing

    async def _take_slot(
        self, caller: str, idempotency_key: str | None, call_id: str
    ) -> str | None:
        """The caller's placement slot (1:1 and group calls alike) and the key's
        reservation, at once; returns the call an earlier use of the key made."""
        verdict = await self.store.take_placement(
            caller,
            self.settings.calls_per_minute,
            idempotency_key=idempotency_key,
            call_id=call_id,
        )
        if verdict.replay_of is not None:
            return verdict.replay_of
        if not verdict.allowed:
            raise RateLimited(verdict.retry_after_ms)
        return None

    async def place(
        self,
        caller: str,
        callee: str,
        media: MediaKind,
        *,
        device_id: str | None,
        idempotency_key: str | None,
    ) -> Call:
        call_id = new_call_id()
        earlier = await self._take_slot(caller, idempotency_key, call_id)
        if earlier is not None:
            return await self._placed_earlier(earlier)
        step = d.new_one_to_one(call_id, caller, callee, media, device_id, utcnow())
        return await self._commit_placement(step, caller, idempotency_key)

    async def place_group(
        self,
        starter: str,
        group: str,
        media: MediaKind,
        *,
        device_id: str | None,
        idempotency_key: str | None,
    ) -> Call:
        """A group call: NotFound unless the starter is a member; GroupCallInProgress
        when the group has a live call (the one to join)."""
        members = await self.groups.members(group)
        if starter not in members:
            raise NotFound(group)
        live = await self.store.group_call(group)
        if live is not None:
            if idempotency_key and await self.store.placed_with(starter, idempotency_key) == (
                live.call_id
            ):
                return live  # a retry of the placement that made it
            raise GroupCallInProgress(live.call_id)
        call_id = new_call_id()
        earlier = await self._take_slot(starter, idempotency_key, call_id)
        if earlier is not None:
            return await self._placed_earlier(earlier)
        step = d.new_group_call(
            call_id, starter, group, media, device_id, utcnow(), members=members
        )
        return await self._commit_placement(step, starter, idempotency_key)

    async def _commit_placement(
        self, step: Step[Call], caller: str, idempotency_key: str | None
    ) -> Call:
        commit = self._commit_of(step)
        if idempotency_key:
            commit.claim = [
                self.store.idem_key(caller, idempotency_key),
                step.result.call_id,
                str(self.settings.idempotency_ttl_s * 1000),
            ]
        try:
            await self.store.commit(commit)
        except IdempotentReplay as replay:
            return await self._placed_earlier(replay.call_id)
        # A commit that failed leaves the key reserved for IDEMPOTENCY_RESERVE_MS (retries
        # get 409 until then): releasing it could free the key of a commit that did apply.
        self.publish_soon(commit.events)
        return step.result

    async def _placed_earlier(self, call_id: str) -> Call:
        """The call a request with the same Idempotency-Key made; it may be committing now."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REPLAY_WAIT_S
        while True:
            call = await self.store.get(call_id)
            if call is not None:
                return call
            if loop.time() >= deadline:
                raise PlacementInProgress(call_id)
            await asyncio.sleep(0.02)

    # ------------------------------------------------------------------ policy's verdict

    async def authorized(self, event: CallAuthorized, delivery: Delivery | None = None) -> None:
        async def read(call: Call) -> tuple[dict[str, list[Call]], MediaNode | None]:
            if call.state is not CallState.REQUESTED:
                return {}, None
            if call.group is not None:
                ring = [u for u in event.ring if u in call.participants]
                return (await self.store.live_calls_of(ring) if ring else {}), None
            live = await self.store.live_calls_of([call.peer, call.caller])
            reverse = d.reverse_call(call, live[call.peer])
            return live, await self._pick_if(reverse is not None)

        def decide(
            call: Call, now: Any, reads: tuple[dict[str, list[Call]], MediaNode | None]
        ) -> Step[None]:
            live, node = reads
            return d.decide_authorized(
                call,
                now,
                live=live,
                node=node,
                ring_timeout_s=self.settings.ring_timeout_s,
                ring=event.ring,
            )

        ran = await self._consume(event.call_id, decide, read, delivery)
        if ran is not None and ran.step.changes and ran.call.state is CallState.RINGING:
            TIME_TO_RING.observe(max((utcnow() - ran.call.created_at).total_seconds(), 0.0))

    async def rejected(self, event: CallRejected, delivery: Delivery | None = None) -> None:
        def decide(call: Call, now: Any, _: None) -> Step[Call]:
            step = d.decide_rejected(call, now, event.reason)
            log.info(
                "call %s rejected: %s (detail %s)",
                call.call_id,
                event.reason.value,
                event.detail.value if event.detail else "-",
            )
            return step

        await self._consume(event.call_id, decide, delivery=delivery)

    async def media_connected(
        self, event: CallMediaConnected, delivery: Delivery | None = None
    ) -> None:
        def decide(call: Call, now: Any, _: None) -> Step[None]:
            step = d.decide_media_connected(call, event.node_id, now)
            if call.rejoin_deadline is not None and call.state is CallState.ACTIVE:
                log.info("call %s: media flows on %s after its move", call.call_id, event.node_id)
            return step

        await self._consume(event.call_id, decide, delivery=delivery)

    async def media_failed(self, event: CallMediaFailed, delivery: Delivery | None = None) -> None:
        def decide(call: Call, now: Any, _: None) -> Step[None]:
            return d.decide_media_failed(call, event.node_id, EndReason(event.reason.value), now)

        await self._consume(event.call_id, decide, delivery=delivery)

    async def _consume(
        self,
        call_id: str,
        decide: Callable[[Call, Any, Any], Step[Any]],
        read: Callable[[Call], Awaitable[Any]] = _nothing,
        delivery: Delivery | None = None,
    ) -> Ran | None:
        """Events may come twice or out of order: a step the table refuses is dropped, and
        a commit finds the event's done mark if a copy committed first (AlreadyHandled)."""
        try:
            return await self._run(call_id, decide, read, delivery)
        except NotFound:
            log.warning("event for unknown call %s dropped", call_id)
        except IllegalTransition as exc:
            log.info("event dropped: %s", exc)
        return None

    async def media_peer(self, event: CallMediaPeer, delivery: Delivery | None = None) -> None:
        """A participant's media stopped or flows again: every other joined one hears (a
        copy of the event tells them again what they know; it commits nothing)."""
        call = await self.store.get(event.call_id)
        notices = (
            d.media_peer_notices(call, event.node_id, event.user, event.connection)
            if call is not None
            else []
        )
        if not notices:
            log.info(
                "call_media_peer for %s from %s dropped (not that call's node or party)",
                event.call_id,
                event.node_id,
            )
            return
        await self.hub.deliver(self.pushes(notices, {})[0])

    async def node_draining(
        self, event: MediaNodeDraining, delivery: Delivery | None = None
    ) -> None:
        """Move every call of a draining node (those it named and those indexed on it), each
        in its own commit (none carries the done mark: a copy finds them moved).
        A late or redelivered event about a node that is live and not draining (it came
        back under the same id) moves nothing: the registry has the last word."""
        live = {node.node_id: node for node in await self.registry.live_nodes()}
        node = live.get(event.node_id)
        if node is not None and not node.draining:
            log.info("media_node_draining of %s ignored: it is live, not draining", event.node_id)
            return
        call_ids = set(event.call_ids) | set(await self.store.node_calls(event.node_id))
        await self._move_all(sorted(call_ids), event.node_id, MediaMoveReason.NODE_DRAINING)

    # ------------------------------------------------------------------ moving media

    async def move_media(self, call_id: str, leaving: str, reason: MediaMoveReason) -> bool:
        """Move the call's media off ``leaving`` to a live node that is not draining, and
        tell every joined participant's in-call device (``call.media``). True if this call
        did it; a call already off ``leaving`` (another instance or request moved it) is
        left alone. NoMediaNode when no node can take it (a lost node's call then starts
        its rejoin deadline all the same, and ends ``media_timeout`` unless a node takes
        it in time)."""

        async def read(call: Call) -> MediaNode | None:
            needed = call.media_node == leaving and call.state in IN_CALL_STATES
            return await self._pick_if(needed, avoid=leaving)

        def decide(call: Call, now: Any, node: MediaNode | None) -> Step[Moved]:
            return d.decide_move(
                call, leaving, node, reason, now, grace_s=self.settings.media_rejoin_grace_s
            )

        try:
            step = (await self._run(call_id, decide, read)).step
        except NotFound:
            await self.store.forget_node_call(leaving, call_id)
            return False
        if step.result.stranded:
            raise NoMediaNode()
        moved = step.result.moved
        if moved is None:
            # Nothing to move: the call is off that node already or over. An index entry
            # left behind (there should be none) goes, so the watcher stops looking.
            await self.store.forget_node_call(leaving, call_id)
            return False
        MEDIA_MOVES.labels(reason.value).inc()
        log.info(
            "call %s moved from %s to %s (%s)", call_id, leaving, moved.media_node, reason.value
        )
        return True

    async def _move_all(
        self, call_ids: Sequence[str], leaving: str, reason: MediaMoveReason
    ) -> int:
        results = await asyncio.gather(
            *(self.move_media(call_id, leaving, reason) for call_id in call_ids),
            return_exceptions=True,
        )
        moved = 0
        for call_id, result in zip(call_ids, results, strict=True):
            if isinstance(result, NoMediaNode):
                log.warning("call %s cannot leave %s: no other media node", call_id, leaving)
            elif isinstance(result, BaseException):
                log.error("moving call %s off %s failed: %r", call_id, leaving, result)
            elif result:
                moved += 1
        return moved

    async def move_off_unusable_nodes(self) -> int:
        """The node watcher's pass: calls on nodes gone from the registry (``node_lost``)
        or draining (``node_draining``) move. Every instance runs it; each call moves once."""
        hosting = await self.store.call_nodes()
        if not hosting:
            return 0
        live = {node.node_id: node for node in await self.registry.live_nodes()}
        moved = 0
        for node_id in hosting:
            node = live.get(node_id)
            if node is not None and not node.draining:
                continue
            reason = MediaMoveReason.NODE_LOST if node is None else MediaMoveReason.NODE_DRAINING
            call_ids = await self.store.node_calls(node_id)
            if call_ids:
                moved += await self._move_all(call_ids, node_id, reason)
        return moved

    async def rejoin_timeout(self, call_id: str) -> bool:
        """End a moved call whose media did not flow on its new node in time; True if this
        instance did (every instance polls; the versioned commit lets one)."""
        try:
            step = (
                await self._run(call_id, lambda c, now, _: d.decide_rejoin_timeout(c, now))
            ).step
        except NotFound:
            await self.store.drop_rejoin(call_id)
            return False
        if step.result is Outcome.NOTHING:
            await self.store.drop_rejoin(call_id)
        if step.result is not Outcome.FIRED:
            return False
        log.info("call %s ended media_timeout: nobody rejoined after its move", call_id)
        return True

    # ------------------------------------------------------------------ the parties

    async def visible(self, user: str, call_id: str) -> Call:
        call = await self.store.get(call_id)
        if call is None or not call.visible_to(user):
            raise NotFound(call_id)
        return call

    async def _is_member(self, call: Call, user: str) -> bool:
        return call.group is not None and await self.groups.is_member(call.group, user)

    async def accept(self, user: str, call_id: str, device_id: str) -> MediaOffer:
        return await self._enter(user, call_id, device_id, d.decide_accept, answering=True)

    async def join(self, user: str, call_id: str, device_id: str | None) -> MediaOffer:
        """A current member joins a group call (``POST /v1/calls/{id}/join``)."""
        return await self._enter(user, call_id, device_id, d.decide_join, answering=False)

    async def _enter(
        self,
        user: str,
        call_id: str,
        device_id: str | None,
        decision: Callable[..., Step[Granted | Again]],
        *,
        answering: bool,
    ) -> MediaOffer:
        """Accept (``answering``) or join: the decision reads the user's group membership
        and, for a ringing call this may answer (a current member of its group; accepting,
        also a 1:1 call's callee), a media node."""

        async def read(call: Call) -> tuple[bool, MediaNode | None]:
            member = await self._is_member(call, user)  # False for a 1:1 call
            callee = answering and call.group is None and user == call.callee
            answers = call.state is CallState.RINGING and (member or callee)
            return member, await self._pick_if(answers)

        def decide(
            call: Call, now: Any, reads: tuple[bool, MediaNode | None]
        ) -> Step[Granted | Again]:
            member, node = reads
            return decision(
                call,
                user,
                device_id,
                now,
                node=node,
                member=member,
                max_participants=self.settings.group_call_max_participants,
            )

        ran = await self._run(call_id, decide, read)
        if isinstance(ran.step.result, Again):
            return await self.media_for(user, call_id)
        offer = ran.minted.get((call_id, user))
        return offer if offer is not None else self._offer(ran.call, user)

    async def media_for(self, user: str, call_id: str) -> MediaOffer:
        """A fresh grant on the call's node, which is live and not draining: a call on a
        node that is gone or draining is moved first (once, however many ask at once).
        Only for a participant in the call (a group call: joined)."""
        for _ in range(MOVE_ATTEMPTS):
            call = await self.visible(user, call_id)
            if call.state not in IN_CALL_STATES or not call.media_node or not call.media_url:
                raise IllegalTransition(call.state, CallAction.ACCEPT, call.call_id)
            part = call.participant(user)
            if call.group is not None and part.state is not ParticipantState.JOINED:
                raise IllegalTransition(
                    call.state, CallAction.ACCEPT, call.call_id, participant=part.state
                )
            live = {node.node_id: node for node in await self.registry.live_nodes()}
            node = live.get(call.media_node)
            if node is not None and not node.draining:
                return self._mint(call, user, call.media_node, call.media_url)
            reason = MediaMoveReason.NODE_LOST if node is None else MediaMoveReason.NODE_DRAINING
            await self.move_media(call_id, call.media_node, reason)
        raise NoMediaNode()

    async def decline(self, user: str, call_id: str) -> Call:
        ran = await self._run(call_id, lambda c, now, _: d.decide_decline(c, user, now))
        return ran.call

    async def hangup(self, user: str, call_id: str) -> Call:
        ran = await self._run(call_id, lambda c, now, _: d.decide_hangup(c, user, now))
        return ran.call

    # ------------------------------------------------------------------ ring timers

    async def ring_timeout(self, call_id: str) -> bool:
        """The ring deadline of a call passed: it is missed (1:1), or every invitee it
        still rings for is (group); True if this instance did it."""
        try:
            ran = await self._run(call_id, lambda c, now, _: d.decide_ring_timeout(c, now))
        except NotFound:
            await self.store.drop_ring(call_id)
            return False
        except IllegalTransition:
            return False
        if ran.step.result is Outcome.NOTHING:
            await self.store.drop_ring(call_id)
        if ran.step.result is not Outcome.FIRED:
            return False
        call = ran.call
        if call.ring_deadline is not None:
            at = call.ended_at or utcnow()
            lateness = (at - call.ring_deadline).total_seconds()
            MISSED_LATENESS.observe(max(lateness, 0.0))
            log.info("call %s missed, %.0f ms after its deadline", call_id, lateness * 1000)
        return True

    # ------------------------------------------------------------------ reading

    async def history(
        self, user: str, *, limit: int, before: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        if before is not None and not CURSOR_RE.fullmatch(before):
            raise BadCursor(before)
        calls, next_cursor = await self.store.history(user, limit=limit, before=before)
        now = utcnow()
        items = [item for call in calls if (item := d.history_item(call, user, now))]
        return items, next_cursor

    async def ring_state(self, user: str) -> list[dict[str, Any]]:
        now = utcnow()
        out = [
            item
            for call in await self.store.live_calls(user)
            if (item := d.ring_item(call, user, now))
        ]
        out.sort(key=lambda c: str(c["call_id"]), reverse=True)
        return out

    async def group_call(self, user: str, group: str) -> Call:
        """The group's live call, for a current member (NotFound otherwise)."""
        if not await self.groups.is_member(group, user):
            raise NotFound(group)
        call = await self.store.group_call(group)
        if call is None:
            raise NotFound(group)
        return call

    # ------------------------------------------------------------------ call.media_state

    async def relay_media_state(
        self, user: str, call_id: str, audio: AudioState, video: VideoState
    ) -> None:
        """A participant's microphone and camera, for every other joined participant's
        in-call device (``call.peer``); the camera on in an audio call upgrades the call
        to video."""
        call = await self.visible(user, call_id)
        d.media_state_targets(call, user)  # refused before the budget is touched
        await self._take_signal_token(user, call_id)  # the same budget as call.signal
        if video is VideoState.ON and call.media is MediaKind.AUDIO:
            call = await self._upgrade(user, call_id)
        message = {
            "type": "call.peer",
            "call_id": call_id,
            "user": user,
            "audio": audio.value,
            "video": video.value,
        }
        notices = [d.in_call(call, to, message) for to in d.media_state_targets(call, user)]
        await self.hub.deliver(self.pushes(notices, {})[0])

    async def _upgrade(self, user: str, call_id: str) -> Call:
        ran = await self._run(call_id, lambda c, now, _: d.decide_upgrade(c, user, now))
        if ran.step.writes:
            log.info("call %s upgraded to video by %s", call_id, user)
        return ran.call

    # ------------------------------------------------------------------ call.signal

    async def _take_signal_token(self, user: str, call_id: str) -> None:
        """One budget per user and call, across all their sockets and instances, for
        ``call.signal`` and ``call.media_state``; SignalRateLimited when it is spent."""
        if not await self.store.take_signal_token(
            user,
            call_id,
            rate_per_s=self.settings.signals_per_call_per_s,
            burst=self.settings.signals_per_call_per_s * 2,
        ):
            raise SignalRateLimited(call_id)

    async def relay_signal(
        self,
        user: str,
        device_id: str,
        call_id: str,
        payload: dict[str, Any],
        to: str | None = None,
    ) -> None:
        call = await self.visible(user, call_id)
        route = d.signal_route(call, user, to, ring_devices=self.settings.ring_signal_devices)
        await self._take_signal_token(user, call_id)
        message = {
            "type": "call.signal",
            "call_id": call_id,
            "from": user,
            "from_device": device_id,
            "payload": payload,
        }
        await self.hub.deliver(
            [Push(route.user, message, devices=route.devices, newest=route.newest)]
        )
