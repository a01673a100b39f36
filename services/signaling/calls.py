"""The call operations: each reads the call, lets the transition table decide, commits
atomically (a version check in one Redis script, retried on a conflict), then pushes the
new state to the devices and publishes the events the commit put in the outbox. The
publish runs in the background: the outbox already guarantees the event, so neither a
request nor a consumer waits on the broker (a broker outage costs no request 15 s).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import Counter, Histogram

from services.signaling.domain import (
    IN_CALL_STATES,
    SIGNAL_STATES,
    AudioState,
    Call,
    CallAction,
    IllegalTransition,
    Role,
    VideoState,
    allowed,
    glare_winner,
    media_connected_action,
    media_lost,
    move_media,
    upgrade_to_video,
    utcnow,
)
from services.signaling.presence import Hub, Push
from services.signaling.settings import SignalingSettings
from services.signaling.store import CallStore, Commit, Conflict, IdempotentReplay
from services.signaling.turn import IceServers
from shared.auth import MediaGrant, issue_media_token
from shared.bus import Bus
from shared.contracts import (
    CallAccepted,
    CallAuthorized,
    CallCancelled,
    CallDeclined,
    CallEnded,
    CallMediaConnected,
    CallMediaFailed,
    CallMediaPeer,
    CallMissed,
    CallRejected,
    CallRequested,
    CallRinging,
    CallState,
    EndReason,
    Event,
    MediaKind,
    MediaMoveReason,
    MediaNodeDraining,
    PeerConnection,
)
from shared.ids import new_call_id
from shared.media_registry import MediaNode, MediaRegistry

log = logging.getLogger(__name__)

MAX_COMMIT_ATTEMPTS = 20
PUBLISH_DRAIN_S = 5.0
"""At shutdown, how long background publishes may finish (the rest: the outbox relay's)."""
REPLAY_WAIT_S = 2.0
"""How long a retry waits for the concurrent placement holding its Idempotency-Key."""
GLARE_DEVICE = "glare"
"""``device_id`` of a glare accept when the answering party's device is not known."""

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


class NotFound(Exception):
    pass


class NoMediaNode(Exception):
    pass


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
    state: CallState
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


@dataclass
class Step:
    """What one decision commits and what happens after: events are in the commit."""

    commit: Commit = field(default_factory=Commit)
    pushes: list[Push] = field(default_factory=list)
    result: Any = None


Decide = Callable[[Call], Awaitable[Step]]


def _state_message(call: Call, now: datetime, **extra: Any) -> dict[str, Any]:
    return {"type": "call.state", **call.public(now), "answered_elsewhere": False, **extra}


class CallService:
    def __init__(
        self,
        settings: SignalingSettings,
        store: CallStore,
        hub: Hub,
        bus: Bus,
        registry: MediaRegistry,
    ) -> None:
        self.settings = settings
        self.store = store
        self.hub = hub
        self.bus = bus
        self.registry = registry
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

    async def _run(self, call_id: str, decide: Decide) -> Step:
        """Read, decide, commit with a version check; on a conflict, read again."""
        for _ in range(MAX_COMMIT_ATTEMPTS):
            call = await self.store.get(call_id)
            if call is None:
                raise NotFound(call_id)
            step = await decide(call)
            if step.commit.calls or step.commit.events:  # else: nothing to change
                try:
                    await self.store.commit(step.commit)
                except Conflict:
                    continue
            await self._after(step)
            return step
        raise RuntimeError(f"call {call_id}: too many concurrent changes")

    async def _after(self, step: Step) -> None:
        # Both only after the commit; neither the devices nor the caller wait for the
        # broker. The commit stands whatever happens here: an unpublished event stays in
        # the outbox for the relay, and a lost push is read back through the ring state.
        self.publish_soon(step.commit.events)
        try:
            await self.hub.deliver(step.pushes)
        except Exception as exc:
            log.warning("after-commit pushes failed: %r", exc)

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

    def _mint(self, call: Call, user: str, node_id: str, url: str) -> MediaOffer:
        token = issue_media_token(
            self.settings,
            # while a moved call's rejoin deadline runs, its new room waits that long
            MediaGrant(
                call_id=call.call_id,
                user_id=user,
                node_id=node_id,
                moved=call.rejoin_deadline is not None,
            ),
            ttl_s=self.settings.media_token_ttl_s,
        )
        return MediaOffer(call.call_id, call.state, url, token, node_id, self.ice.for_user(user))

    def ice_servers(self, user: str) -> list[dict[str, Any]]:
        """The ICE servers for ``user``'s peer connections, TURN credentials fresh."""
        return self.ice.for_user(user)

    def _fanout(self, call: Call, now: datetime, *, callee_too: bool, **extra: Any) -> list[Push]:
        """``call.state`` to the caller's devices and (if it rang for them) the callee's."""
        message = _state_message(call, now, **extra)
        pushes = [Push(call.caller, message)]
        if callee_too:
            if call.answered_device and call.answered_device != GLARE_DEVICE:
                pushes.append(Push(call.callee, message, devices=frozenset({call.answered_device})))
            else:
                pushes.append(Push(call.callee, message))
        return pushes

    def _in_call_push(self, call: Call, user: str, message: dict[str, Any]) -> Push:
        """``message`` for ``user``'s device in the call: the answering one, the one the
        caller called from (all of theirs when it is not known)."""
        device = call.answered_device if user == call.callee else call.caller_device
        if device and device != GLARE_DEVICE:
            return Push(user, message, devices=frozenset({device}))
        return Push(user, message)

    def _accepted_pushes(self, call: Call, now: datetime) -> tuple[list[Push], MediaOffer]:
        """Accepted: each party its own media; the callee's other devices: answered elsewhere."""
        assert call.media_node and call.media_url
        caller_offer = self._mint(call, call.caller, call.media_node, call.media_url)
        callee_offer = self._mint(call, call.callee, call.media_node, call.media_url)
        base = _state_message(call, now)
        pushes = [Push(call.caller, {**base, **caller_offer.media_fields()})]
        callee_message = {**base, **callee_offer.media_fields()}
        if call.answered_device and call.answered_device != GLARE_DEVICE:
            device = call.answered_device
            pushes.append(Push(call.callee, callee_message, devices=frozenset({device})))
            elsewhere = {
                **base,
                "answered_elsewhere": True,
                "end_reason": EndReason.ANSWERED_ELSEWHERE.value,
            }
            pushes.append(Push(call.callee, elsewhere, except_devices=frozenset({device})))
        else:
            pushes.append(Push(call.callee, callee_message))
        return pushes, callee_offer

    async def _pick_node(self) -> MediaNode:
        node = await self.registry.pick()
        if node is None:
            raise NoMediaNode()
        return node

    # ------------------------------------------------------------------ placing

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
        # The rate slot and the key's reservation are taken at once: concurrent retries
        # with one key take one slot, and a replay takes none.
        verdict = await self.store.take_placement(
            caller,
            self.settings.calls_per_minute,
            idempotency_key=idempotency_key,
            call_id=call_id,
        )
        if verdict.replay_of is not None:
            return await self._placed_earlier(verdict.replay_of)
        if not verdict.allowed:
            raise RateLimited(verdict.retry_after_ms)
        call = Call(
            call_id=call_id,
            caller=caller,
            callee=callee,
            media=media,
            state=CallState.REQUESTED,
            created_at=utcnow(),
            caller_device=device_id,
        )
        commit = Commit()
        self.store.stage(commit, None, call)
        commit.events.append(
            CallRequested(call_id=call.call_id, caller=caller, callee=callee, media=media)
        )
        if idempotency_key:
            commit.claim = [
                self.store.idem_key(caller, idempotency_key),
                call.call_id,
                str(self.settings.idempotency_ttl_s * 1000),
            ]
        try:
            await self.store.commit(commit)
        except IdempotentReplay as replay:
            return await self._placed_earlier(replay.call_id)
        # A commit that failed leaves the key reserved for IDEMPOTENCY_RESERVE_MS (retries
        # get 409 until then): releasing it could free the key of a commit that did apply.
        self.publish_soon(commit.events)
        return call

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

    async def authorized(self, event: CallAuthorized) -> None:
        async def decide(call: Call) -> Step:
            step = Step()
            if not allowed(call.state, CallAction.AUTHORIZE):
                raise IllegalTransition(call.state, CallAction.AUTHORIZE, call.call_id)
            now = utcnow()
            live = await self.store.live_calls_of([call.callee, call.caller])
            callee_all, caller_all = live[call.callee], live[call.caller]
            callee_live = [c for c in callee_all if c.call_id != call.call_id]
            caller_live = [c for c in caller_all if c.call_id != call.call_id]
            self.store.check(step.commit, callee_live)
            if any(c.state in IN_CALL_STATES for c in callee_live):
                busy = call.step(CallAction.CALLEE_BUSY, at=now)
                self.store.stage(step.commit, call, busy)
                step.commit.events.append(
                    CallEnded(
                        call_id=call.call_id,
                        caller=call.caller,
                        callee=call.callee,
                        reason=EndReason.BUSY,
                        duration_s=0.0,
                    )
                )
                step.pushes = self._fanout(busy, now, callee_too=False)
                return step
            # The reverse call is looked for among the callee's live calls: it is there from
            # its creation (the callee placed it), and those calls' versions are checked at
            # commit, so a reverse call that starts ringing after this read makes the commit
            # retry and the retry finds it ringing. The caller's set holds it only once it
            # rings, and its calls are not version-checked: looked for there, both calls
            # could end up ringing.
            reverse = [
                c
                for c in callee_live
                if c.caller == call.callee
                and c.callee == call.caller
                and c.state is CallState.RINGING
            ]
            if reverse:
                node = await self.registry.pick()
                if node is not None:
                    return self._glare(step, call, reverse[0], node, now, caller_live)
            ringing = call.step(
                CallAction.AUTHORIZE,
                at=now,
                ring_deadline=now + timedelta(seconds=self.settings.ring_timeout_s),
            )
            assert ringing.ring_deadline is not None
            self.store.stage(step.commit, call, ringing)
            step.commit.events.append(
                CallRinging(
                    call_id=call.call_id,
                    caller=call.caller,
                    callee=call.callee,
                    media=call.media,
                    ring_deadline=ringing.ring_deadline,
                )
            )
            step.pushes = [
                Push(call.caller, _state_message(ringing, now)),
                Push(call.callee, {"type": "call.incoming", **ringing.public(now)}),
            ]
            return step

        await self._consume(event.call_id, decide)

    def _glare(
        self,
        step: Step,
        call: Call,
        other: Call,
        node: MediaNode,
        now: datetime,
        caller_live: list[Call],
    ) -> Step:
        """``call`` was just authorized while ``other`` (the reverse direction) rings."""
        self.store.check(step.commit, caller_live)
        if glare_winner(call.call_id, other.call_id) == other.call_id:
            winner, loser = other, call
        else:
            winner, loser = call, other
        # The winner's callee is the loser's caller: the device they called from answers.
        device = loser.caller_device or GLARE_DEVICE
        won = winner.step(
            CallAction.GLARE_WIN,
            at=now,
            answered_device=device,
            media_node=node.node_id,
            media_url=node.session_url(winner.call_id),
        )
        lost = loser.step(CallAction.GLARE_LOSE, at=now, replaced_by=winner.call_id)
        self.store.stage(step.commit, loser, lost)
        self.store.stage(step.commit, winner, won)
        step.commit.events.append(
            CallCancelled(call_id=lost.call_id, caller=lost.caller, callee=lost.callee)
        )
        step.commit.events.append(
            CallAccepted(
                call_id=won.call_id, caller=won.caller, callee=won.callee, device_id=device
            )
        )
        lost_rang = loser.state is CallState.RINGING
        step.pushes = self._fanout(lost, now, callee_too=lost_rang)
        accepted_pushes, _ = self._accepted_pushes(won, now)
        step.pushes.extend(accepted_pushes)
        log.info("glare: %s survives, %s ends", won.call_id, lost.call_id)
        return step

    async def rejected(self, event: CallRejected) -> None:
        async def decide(call: Call) -> Step:
            step = Step()
            now = utcnow()
            after = call.step(CallAction.REJECT, at=now, reject_reason=event.reason)
            self.store.stage(step.commit, call, after)
            step.pushes = self._fanout(after, now, callee_too=False)
            log.info(
                "call %s rejected: %s (detail %s)",
                call.call_id,
                event.reason.value,
                event.detail.value if event.detail else "-",
            )
            return step

        await self._consume(event.call_id, decide)

    async def media_connected(self, event: CallMediaConnected) -> None:
        async def decide(call: Call) -> Step:
            action = media_connected_action(call)
            _from_the_calls_node(call, action, event.node_id)
            step = Step()
            now = utcnow()
            after = call.step(action, at=now)
            self.store.stage(step.commit, call, after)
            if action is CallAction.MEDIA_RESUMED:
                log.info("call %s: media flows on %s after its move", call.call_id, event.node_id)
            else:
                step.pushes = self._fanout(after, now, callee_too=True)
            if call.rejoin_deadline is not None:
                # Media flows on the new node for both: whatever the old node last said
                # (a party reconnecting), each party's peer is connected now.
                for user in (after.caller, after.callee):
                    message = {
                        "type": "call.peer",
                        "call_id": after.call_id,
                        "user": user,
                        "connection": PeerConnection.CONNECTED.value,
                    }
                    step.pushes.append(self._in_call_push(after, after.other(user), message))
            return step

        await self._consume(event.call_id, decide)

    async def media_failed(self, event: CallMediaFailed) -> None:
        async def decide(call: Call) -> Step:
            _from_the_calls_node(call, CallAction.MEDIA_FAILED, event.node_id)
            step = Step()
            now = utcnow()
            after = call.step(
                CallAction.MEDIA_FAILED, at=now, media_failure=EndReason(event.reason.value)
            )
            self.store.stage(step.commit, call, after)
            step.commit.events.append(self._ended(after, now))
            step.pushes = self._fanout(after, now, callee_too=True)
            return step

        await self._consume(event.call_id, decide)

    async def _consume(self, call_id: str, decide: Decide) -> None:
        """Events may come twice or out of order: a step the table refuses is dropped."""
        try:
            await self._run(call_id, decide)
        except NotFound:
            log.warning("event for unknown call %s dropped", call_id)
        except IllegalTransition as exc:
            log.info("event dropped: %s", exc)

    async def media_peer(self, event: CallMediaPeer) -> None:
        """A party's media stopped or flows again: the other party's in-call device hears."""
        call = await self.store.get(event.call_id)
        if (
            call is None
            or call.state not in IN_CALL_STATES
            or call.media_node != event.node_id
            or call.role_of(event.user) is None
        ):
            log.info(
                "call_media_peer for %s from %s dropped (not that call's node or party)",
                event.call_id,
                event.node_id,
            )
            return
        message = {
            "type": "call.peer",
            "call_id": call.call_id,
            "user": event.user,
            "connection": event.connection.value,
        }
        await self.hub.deliver([self._in_call_push(call, call.other(event.user), message)])

    async def node_draining(self, event: MediaNodeDraining) -> None:
        """Move every call of a draining node (those it named and those indexed on it).
        A late or redelivered event about a node that is live and not draining (it came
        back under the same id) moves nothing: the registry has the last word."""
        live = {node.node_id: node for node in await self.registry.live_nodes()}
        node = live.get(event.node_id)
        if node is not None and not node.draining:
            log.info("media_node_draining of %s ignored: it is live, not draining", event.node_id)
            return
        call_ids = set(event.call_ids) | set(await self.store.node_calls(event.node_id))
        await self._move_all(sorted(call_ids), event.node_id, MediaMoveReason.NODE_DRAINING)

    def _ended(self, call: Call, now: datetime) -> CallEnded:
        assert call.end_reason is not None
        return CallEnded(
            call_id=call.call_id,
            caller=call.caller,
            callee=call.callee,
            reason=call.end_reason,
            duration_s=call.duration_s(now),
            media=call.media,
        )

    # ------------------------------------------------------------------ moving media

    async def move_media(self, call_id: str, leaving: str, reason: MediaMoveReason) -> bool:
        """Move the call's media off ``leaving`` to a live node that is not draining, and
        tell both parties' in-call devices (``call.media``). True if this call did it; a
        call already off ``leaving`` (another instance or request moved it) is left alone.
        NoMediaNode when no node can take it (a lost node's call then starts its rejoin
        deadline all the same, and ends ``media_timeout`` unless a node takes it in time)."""

        stranded = False

        async def decide(call: Call) -> Step:
            nonlocal stranded
            if call.media_node != leaving or call.state not in IN_CALL_STATES:
                return Step()
            node = await self.registry.pick(avoid=leaving)
            now = utcnow()
            # From the move (or the loss): a lost node's parties stopped about a registry
            # TTL before it, so a call nobody rejoins ends within TTL + grace of the crash.
            grace = self.settings.media_rejoin_grace_s
            if node is None:
                stranded = True
                if reason is not MediaMoveReason.NODE_LOST:
                    return Step()  # a draining node forwards on; it is lost once it exits
                waiting = media_lost(
                    call, node_id=leaving, at=now, rejoin_deadline=now + timedelta(seconds=grace)
                )
                step = Step()
                if waiting is not None:  # no node to move to: the deadline runs all the same
                    self.store.stage(step.commit, call, waiting)
                return step
            stranded = False
            after = move_media(
                call,
                leaving=leaving,
                node_id=node.node_id,
                media_url=node.session_url(call.call_id),
                at=now,
                rejoin_deadline=now + timedelta(seconds=grace),
            )
            if after is None:
                return Step()
            step = Step(result=after)
            self.store.stage(step.commit, call, after)
            for user in (after.caller, after.callee):
                offer = self._mint(after, user, node.node_id, node.session_url(call.call_id))
                message = {
                    "type": "call.media",
                    "call_id": after.call_id,
                    **offer.media_fields(),
                    "reason": reason.value,
                }
                step.pushes.append(self._in_call_push(after, user, message))
            return step

        try:
            step = await self._run(call_id, decide)
        except NotFound:
            await self.store.forget_node_call(leaving, call_id)
            return False
        if stranded:
            raise NoMediaNode()
        if step.result is None:
            # Nothing to move: the call is off that node already or over. An index entry
            # left behind (there should be none) goes, so the watcher stops looking.
            await self.store.forget_node_call(leaving, call_id)
            return False
        moved: Call = step.result
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

        async def decide(call: Call) -> Step:
            action = CallAction.MEDIA_FAILED
            if call.state not in IN_CALL_STATES or call.rejoin_deadline is None:
                raise IllegalTransition(call.state, action, call.call_id)
            if call.rejoin_deadline > utcnow():
                raise IllegalTransition(call.state, action, call.call_id)
            step = Step()
            now = utcnow()
            after = call.step(action, at=now, media_failure=EndReason.MEDIA_TIMEOUT)
            self.store.stage(step.commit, call, after)
            step.commit.events.append(self._ended(after, now))
            step.pushes = self._fanout(after, now, callee_too=True)
            step.result = after
            return step

        try:
            await self._run(call_id, decide)
        except NotFound:
            await self.store.drop_rejoin(call_id)
            return False
        except IllegalTransition:
            call = await self.store.get(call_id)
            if call is None or call.rejoin_deadline is None or call.state not in IN_CALL_STATES:
                await self.store.drop_rejoin(call_id)
            return False
        log.info("call %s ended media_timeout: nobody rejoined after its move", call_id)
        return True

    # ------------------------------------------------------------------ the parties

    async def visible(self, user: str, call_id: str) -> Call:
        call = await self.store.get(call_id)
        if call is None or not call.visible_to(user):
            raise NotFound(call_id)
        return call

    async def accept(self, user: str, call_id: str, device_id: str) -> MediaOffer:
        offer_box: list[MediaOffer] = []

        async def decide(call: Call) -> Step:
            if not call.visible_to(user):
                raise NotFound(call_id)
            if (
                call.role_of(user) is Role.CALLEE
                and call.state in IN_CALL_STATES
                and call.answered_device == device_id
            ):
                return Step(result="again")
            if call.role_of(user) is not Role.CALLEE:
                raise IllegalTransition(call.state, CallAction.ACCEPT, call.call_id)
            if not allowed(call.state, CallAction.ACCEPT):
                raise IllegalTransition(call.state, CallAction.ACCEPT, call.call_id)
            node = await self._pick_node()
            step = Step()
            now = utcnow()
            after = call.step(
                CallAction.ACCEPT,
                at=now,
                answered_device=device_id,
                media_node=node.node_id,
                media_url=node.session_url(call.call_id),
            )
            self.store.stage(step.commit, call, after)
            step.commit.events.append(
                CallAccepted(
                    call_id=call.call_id,
                    caller=call.caller,
                    callee=call.callee,
                    device_id=device_id,
                )
            )
            step.pushes, offer = self._accepted_pushes(after, now)
            offer_box.append(offer)
            return step

        step = await self._run(call_id, decide)
        if step.result == "again" or not offer_box:
            return await self.media_for(user, call_id)
        return offer_box[-1]

    async def media_for(self, user: str, call_id: str) -> MediaOffer:
        """A fresh grant on the call's node, which is live and not draining: a call on a
        node that is gone or draining is moved first (once, however many ask at once)."""
        for _ in range(MOVE_ATTEMPTS):
            call = await self.visible(user, call_id)
            if call.state not in IN_CALL_STATES or not call.media_node or not call.media_url:
                raise IllegalTransition(call.state, CallAction.ACCEPT, call.call_id)
            live = {node.node_id: node for node in await self.registry.live_nodes()}
            node = live.get(call.media_node)
            if node is not None and not node.draining:
                return self._mint(call, user, call.media_node, call.media_url)
            reason = MediaMoveReason.NODE_LOST if node is None else MediaMoveReason.NODE_DRAINING
            await self.move_media(call_id, call.media_node, reason)
        raise NoMediaNode()

    async def decline(self, user: str, call_id: str) -> Call:
        async def decide(call: Call) -> Step:
            if not call.visible_to(user):
                raise NotFound(call_id)
            if call.role_of(user) is not Role.CALLEE:
                raise IllegalTransition(call.state, CallAction.DECLINE, call.call_id)
            return self._end_before_answer(call, CallAction.DECLINE)

        step = await self._run(call_id, decide)
        return step.result  # type: ignore[no-any-return]

    async def hangup(self, user: str, call_id: str) -> Call:
        async def decide(call: Call) -> Step:
            if not call.visible_to(user):
                raise NotFound(call_id)
            role = call.role_of(user)
            if call.state in (CallState.REQUESTED, CallState.RINGING):
                action = CallAction.CANCEL if role is Role.CALLER else CallAction.DECLINE
                return self._end_before_answer(call, action)
            step = Step()
            now = utcnow()
            after = call.step(CallAction.HANGUP, at=now)
            self.store.stage(step.commit, call, after)
            step.commit.events.append(self._ended(after, now))
            step.pushes = self._fanout(after, now, callee_too=True)
            step.result = after
            return step

        step = await self._run(call_id, decide)
        return step.result  # type: ignore[no-any-return]

    def _end_before_answer(self, call: Call, action: CallAction) -> Step:
        step = Step()
        now = utcnow()
        rang = call.state is CallState.RINGING
        after = call.step(action, at=now)
        self.store.stage(step.commit, call, after)
        ids = {"call_id": call.call_id, "caller": call.caller, "callee": call.callee}
        if action is CallAction.DECLINE:
            step.commit.events.append(CallDeclined(**ids))
        elif action is CallAction.CANCEL:
            step.commit.events.append(CallCancelled(**ids))
        elif action is CallAction.RING_TIMEOUT:
            step.commit.events.append(CallMissed(**ids, media=call.media))
        step.pushes = self._fanout(after, now, callee_too=rang)
        step.result = after
        return step

    # ------------------------------------------------------------------ ring timers

    async def ring_timeout(self, call_id: str) -> bool:
        """Mark a ringing call missed if its deadline passed; True if this instance did."""

        async def decide(call: Call) -> Step:
            if call.state is not CallState.RINGING:
                raise IllegalTransition(call.state, CallAction.RING_TIMEOUT, call.call_id)
            if call.ring_deadline is None or call.ring_deadline > utcnow():
                raise IllegalTransition(call.state, CallAction.RING_TIMEOUT, call.call_id)
            return self._end_before_answer(call, CallAction.RING_TIMEOUT)

        try:
            step = await self._run(call_id, decide)
        except NotFound:
            await self.store.drop_ring(call_id)
            return False
        except IllegalTransition as exc:
            if exc.state is not CallState.RINGING:
                await self.store.drop_ring(call_id)
            return False
        missed: Call = step.result
        if missed.ring_deadline is not None and missed.ended_at is not None:
            lateness = (missed.ended_at - missed.ring_deadline).total_seconds()
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
        items = []
        for call in calls:
            if not call.visible_to(user):
                continue
            incoming = call.callee == user and call.caller != user
            items.append(
                {
                    **call.public(now),
                    "direction": "incoming" if incoming else "outgoing",
                    "missed": incoming and call.state in (CallState.MISSED, CallState.BUSY),
                }
            )
        return items, next_cursor

    async def ring_state(self, user: str) -> list[dict[str, Any]]:
        now = utcnow()
        out = []
        for call in await self.store.live_calls(user):
            if call.callee == user and call.state is CallState.RINGING:
                out.append({**call.public(now), "direction": "incoming"})
            elif call.caller == user and call.state in (CallState.REQUESTED, CallState.RINGING):
                out.append({**call.public(now), "direction": "outgoing"})
        out.sort(key=lambda c: str(c["call_id"]), reverse=True)
        return out

    # ------------------------------------------------------------------ call.media_state

    async def relay_media_state(
        self, user: str, call_id: str, audio: AudioState, video: VideoState
    ) -> None:
        """A party's microphone and camera, for the other party's in-call device
        (``call.peer``); the camera on in an audio call upgrades the call to video."""
        call = await self.visible(user, call_id)
        if call.state not in IN_CALL_STATES:
            raise IllegalTransition(call.state, CallAction.UPGRADE_VIDEO, call.call_id)
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
        await self.hub.deliver([self._in_call_push(call, call.other(user), message)])

    async def _upgrade(self, user: str, call_id: str) -> Call:
        async def decide(call: Call) -> Step:
            if not call.visible_to(user):
                raise NotFound(call_id)
            upgraded = upgrade_to_video(call, at=utcnow())
            step = Step(result=upgraded or call)
            if upgraded is not None:
                self.store.stage(step.commit, call, upgraded)
                log.info("call %s upgraded to video by %s", call_id, user)
            return step

        step = await self._run(call_id, decide)
        return step.result  # type: ignore[no-any-return]

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
        self, user: str, device_id: str, call_id: str, payload: dict[str, Any]
    ) -> None:
        call = await self.visible(user, call_id)
        if call.state not in SIGNAL_STATES:
            raise IllegalTransition(call.state, CallAction.HANGUP, call.call_id)
        await self._take_signal_token(user, call_id)
        other = call.other(user)
        devices: frozenset[str] | None = None
        newest: int | None = None
        if other == call.callee and call.state in IN_CALL_STATES:
            if call.answered_device and call.answered_device != GLARE_DEVICE:
                devices = frozenset({call.answered_device})
        elif other == call.callee:
            # Ringing: not every device of the callee for every frame of the caller.
            newest = self.settings.ring_signal_devices
        elif other == call.caller and call.caller_device:
            devices = frozenset({call.caller_device})
        message = {
            "type": "call.signal",
            "call_id": call_id,
            "from": user,
            "from_device": device_id,
            "payload": payload,
        }
        await self.hub.deliver([Push(other, message, devices=devices, newest=newest)])


def _from_the_calls_node(call: Call, action: CallAction, node_id: str) -> None:
    """A media event counts only from the node that hosts the call's room."""
    if call.media_node and call.media_node != node_id:
        raise IllegalTransition(call.state, action, call.call_id)
