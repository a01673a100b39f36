"""This node's rooms: admission, sessions, the media watchdog and the media events.

Rooms live in this process only (a call's legs are all placed on one node), so the
events that close them are consumed by every instance (``Scope.INSTANCE``): every node
hears of every call that ends. A node records the end only of a call it knows of, one
it hosts a room for or was granted (a media token for it was presented here), and
forgets both after ``MEDIA_ENDED_CALL_MEMORY_S``, whether or not anyone asks again.

A participant whose packets stop is ``reconnecting`` (``call_media_peer``), ``connected``
again when they flow; a 1:1 call fails ``media_timeout`` only if it stays reconnecting past
``MEDIA_REJOIN_GRACE_S`` (in a group call that participant's session is dropped instead,
and the call fails only when nobody is left). ``call_participant_left`` closes that
participant's sessions and refuses its grants issued before the leave. On SIGTERM the
node drains (:meth:`Rooms.start_drain`): it refuses new sessions (``node_draining``),
asks for its calls to be moved (``media_node_draining``), forwards on, publishes nothing
more about its calls, and is :attr:`Rooms.drained` once every room is abandoned (every
participant left or went silent) or ``MEDIA_DRAIN_S`` passed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from services.media.delays import DelayRecorder
from services.media.expiring import ExpiringMap, ExpiringSet
from services.media.room import CloseReason, NegotiationError, Participant, Room, RoomState
from services.media.sdp import BadOffer, check_offer
from services.media.settings import MediaSettings
from shared.auth import MediaGrant
from shared.contracts import (
    CallMediaConnected,
    CallMediaFailed,
    CallMediaPeer,
    Event,
    MediaFailure,
    MediaNodeDraining,
)

log = logging.getLogger(__name__)

WATCHDOG_PERIOD_S = 0.5

Spawn = Callable[[Coroutine[Any, Any, Any], str], None]


class Refusal(StrEnum):
    """Why a session is refused; each has its HTTP status in :data:`REFUSAL_STATUS`."""

    BAD_TOKEN = "bad_token"
    WRONG_CALL = "wrong_call"
    WRONG_NODE = "wrong_node"
    ROOM_FULL = "room_full"
    PARTICIPANT_LEFT = "participant_left"
    CALL_ENDED = "call_ended"
    NODE_FULL = "node_full"
    NODE_DRAINING = "node_draining"
    BAD_OFFER = "bad_offer"


REFUSAL_STATUS: dict[Refusal, int] = {
    Refusal.BAD_TOKEN: 401,
    Refusal.WRONG_CALL: 403,
    Refusal.WRONG_NODE: 403,
    Refusal.ROOM_FULL: 403,
    Refusal.PARTICIPANT_LEFT: 403,
    Refusal.CALL_ENDED: 409,
    Refusal.NODE_FULL: 503,
    Refusal.NODE_DRAINING: 503,
    Refusal.BAD_OFFER: 400,
}


class SessionRefused(Exception):
    def __init__(self, reason: Refusal, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = REFUSAL_STATUS[reason]


@dataclass(frozen=True, slots=True)
class Session:
    call_id: str
    session_id: str
    answer_sdp: str


class Rooms:
    def __init__(
        self,
        settings: MediaSettings,
        publish: Callable[[Event], Coroutine[Any, Any, None]],
        spawn: Spawn,
    ) -> None:
        self.settings = settings
        self._publish = publish
        self._spawn = spawn
        self.rooms: dict[str, Room] = {}
        self.granted = ExpiringSet(settings.ended_call_memory_s)
        """Calls a media token for this node was presented for (last presented first)."""
        self.ended = ExpiringSet(settings.ended_call_memory_s)
        """Calls that ended and that this node hosted or was granted: refused sessions."""
        self.unseen_ended = ExpiringSet(settings.unseen_ended_call_memory_s)
        """Calls that ended before this node saw them, for as long as a media token for
        them may still be presented (so a late token opens no room for an ended call)."""
        self.left = ExpiringMap(settings.unseen_ended_call_memory_s)
        """``call_id/user`` -> when that participant left the call (Unix seconds, the
        event's ``occurred_at``): its grants issued before are refused. Kept
        MEDIA_UNSEEN_ENDED_CALL_MEMORY_S (above the media token TTL: no grant issued
        before the leave is still valid after it)."""
        self._candidate_rules = settings.candidate_rules
        self.candidates_dropped = 0
        self.delays = DelayRecorder()
        self.load_changed = asyncio.Event()
        self.events_published: dict[str, int] = {}
        self.refused: dict[Refusal, int] = dict.fromkeys(Refusal, 0)
        self.failures: dict[MediaFailure, int] = dict.fromkeys(MediaFailure, 0)
        self.draining_since: float | None = None
        """When SIGTERM came (monotonic); None while the node takes calls."""
        self.drained = asyncio.Event()
        """Set once a draining node's rooms are all abandoned, or MEDIA_DRAIN_S passed."""

    @property
    def draining(self) -> bool:
        return self.draining_since is not None

    @property
    def load(self) -> int:
        return len(self.rooms)

    # ------------------------------------------------------------------ admission

    def refuse(self, reason: Refusal, message: str) -> SessionRefused:
        self.refused[reason] += 1
        return SessionRefused(reason, message)

    def admit(self, grant: MediaGrant, call_id: str) -> None:
        """Checks that need no SDP: the grant is for this call, this node, a party."""
        if self.draining:
            raise self.refuse(
                Refusal.NODE_DRAINING, "this media node is shutting down; ask for a new grant"
            )
        if grant.call_id != call_id:
            raise self.refuse(Refusal.WRONG_CALL, "the media token is for another call")
        if grant.node_id != self.settings.node_id:
            raise self.refuse(
                Refusal.WRONG_NODE,
                f"the media token is for media node {grant.node_id!r}, this is "
                f"{self.settings.node_id!r}",
            )
        now = time.monotonic()
        if self.ended.contains(call_id, now) or self.unseen_ended.contains(call_id, now):
            raise self.refuse(Refusal.CALL_ENDED, "this call has ended")
        self.granted.put(call_id, now)
        left_at = self.left.get(f"{call_id}/{grant.user_id}", now)
        if left_at is not None and (grant.issued_at is None or grant.issued_at < left_at):
            raise self.refuse(
                Refusal.PARTICIPANT_LEFT,
                "this media token was issued before you left the call; join it again",
            )
        room = self.rooms.get(call_id)
        if room is not None:
            self._check_room(room, grant)
        if room is None and self.load >= self.settings.capacity:
            raise self.refuse(Refusal.NODE_FULL, "this media node is full")

    def _check_room(self, room: Room, grant: MediaGrant) -> None:
        if room.group != grant.group:
            raise self.refuse(
                Refusal.WRONG_CALL,
                "the media token is for another kind of call (1:1 or group) than this room",
            )
        if not room.admits(grant.user_id):
            if room.group is None:
                raise self.refuse(Refusal.ROOM_FULL, "the room admits only the call's two parties")
            raise self.refuse(
                Refusal.ROOM_FULL, f"the room holds its {room.capacity} participants already"
            )

    def check_offer(self, offer_sdp: str) -> str:
        """The offer as aiortc gets it (refused if unusable, unsafe candidates dropped)."""
        try:
            checked = check_offer(offer_sdp, self._candidate_rules)
        except BadOffer as exc:
            raise self.refuse(Refusal.BAD_OFFER, str(exc)) from exc
        if checked.dropped:
            self.candidates_dropped += checked.dropped
            log.info("offer: %d ICE candidate(s) dropped", checked.dropped)
        return checked.sdp

    # ------------------------------------------------------------------ sessions

    async def open_session(self, grant: MediaGrant, call_id: str, offer_sdp: str) -> Session:
        self.admit(grant, call_id)
        offer_sdp = self.check_offer(offer_sdp)
        return await self._join(grant, call_id, offer_sdp)

    async def _join(self, grant: MediaGrant, call_id: str, offer_sdp: str) -> Session:
        room = self.rooms.get(call_id)
        if room is None:
            room = Room(call_id, self.settings, self.delays, group=grant.group)
            if grant.moved:  # the other party comes from the old node, within the grace
                room.waiting_timeout_s = max(self.settings.timeout_s, self.settings.rejoin_grace_s)
            room.retire = self._retire
            self.rooms[call_id] = room
            self.load_changed.set()
        async with room.lock:
            # Checked again: the room may have changed while this request waited.
            if room.is_open and self.rooms.get(call_id) is not room:
                # Dropped because the first offer into it failed: start over.
                self.admit(grant, call_id)
                return await self._join(grant, call_id, offer_sdp)
            if not room.is_open:
                raise self.refuse(Refusal.CALL_ENDED, "this call's room has closed")
            self._check_room(room, grant)
            session: list[Participant] = []
            try:
                participant, answer = await room.negotiate(
                    grant.user_id,
                    offer_sdp,
                    self._spawn,
                    on_ice_failed=lambda: self.session_failed(room, session),
                    grant_issued_at=grant.issued_at,
                )
                session.append(participant)
            except BaseException as exc:
                if not room.participants:
                    self._forget(room)  # nobody in it: no room, no media timeout for it
                if isinstance(exc, NegotiationError):
                    raise self.refuse(Refusal.BAD_OFFER, str(exc)) from exc
                raise
            earlier = room.join(participant)
        if earlier is not None:
            log.info("room %s: %s rejoined again, earlier rejoin dropped", call_id, grant.user_id)
            self._retire(earlier)
        log.info("room %s: %s joined (session %s)", call_id, grant.user_id, participant.session_id)
        return Session(call_id, participant.session_id, answer)

    async def leave(self, call_id: str, session_id: str) -> Participant | None:
        room = self.rooms.get(call_id)
        if room is None:
            return None
        participant = room.leave(session_id)
        if participant is None:
            return None
        await participant.pc.close()
        if not room.participants:
            await self.close_room(call_id, CloseReason.EMPTY)
        return participant

    async def participant_left(self, call_id: str, user_id: str, left_at: float) -> int:
        """``call_participant_left``: close ``user_id``'s sessions opened with a grant
        issued before ``left_at`` (Unix seconds) and refuse such grants from now on. A
        session from a later grant (the user joined again) stays: a late or redelivered
        event changes nothing. Returns the sessions closed."""
        key = f"{call_id}/{user_id}"
        now = time.monotonic()
        known = self.left.get(key, now)
        self.left.put(key, max(left_at, known) if known is not None else left_at, now)
        room = self.rooms.get(call_id)
        if room is None:
            return 0
        async with room.lock:
            removed = room.drop_user(user_id, granted_before=left_at)
        for participant in removed:
            log.info(
                "room %s: %s left the call; session %s closed",
                call_id,
                user_id,
                participant.session_id,
            )
            await participant.pc.close()
        if removed and not room.participants and self.rooms.get(call_id) is room:
            await self.close_room(call_id, CloseReason.EMPTY)
        return len(removed)

    def session_failed(self, room: Room, session: list[Participant]) -> None:
        """A session's connection failed before it ever connected: a 1:1 call fails
        (``ice_failed``); in a group call only that session is dropped, and the call fails
        only when nobody is left in the room."""
        if room.group is None or not session:
            self.media_failed(room, MediaFailure.ICE_FAILED)
            return
        self._drop_session(room, session[0], MediaFailure.ICE_FAILED)

    def _drop_session(self, room: Room, participant: Participant, reason: MediaFailure) -> None:
        if not room.is_open or self.draining:
            return
        if room.leave(participant.session_id) is None:
            return
        room.links.pop(participant.user_id, None)
        log.warning(
            "room %s: %s's session %s dropped (%s); the call goes on",
            room.call_id,
            participant.user_id,
            participant.session_id,
            reason,
        )
        self._retire(participant)
        if not room.participants:
            self.media_failed(room, reason)

    def _retire(self, participant: Participant) -> None:
        self._spawn(participant.pc.close(), f"close-{participant.session_id}")

    def find(self, call_id: str) -> Room | None:
        return self.rooms.get(call_id)

    async def close_room(self, call_id: str, reason: CloseReason) -> bool:
        if reason in (CloseReason.CALL_ENDED, CloseReason.MEDIA_FAILED):
            self._record_end(call_id)
        room = self.rooms.get(call_id)
        if room is None:
            return False
        self._forget(room)
        room.set_state(RoomState.CLOSED)
        await room.close()
        log.info("room %s closed (%s)", call_id, reason)
        return True

    def _record_end(self, call_id: str) -> None:
        """Remember the end of a call this node knows of for MEDIA_ENDED_CALL_MEMORY_S; any
        other only as long as a token for it may still come (MEDIA_UNSEEN_ENDED_CALL_MEMORY_S,
        above signaling's media token TTL): memory bounded by the end rate times that."""
        now = time.monotonic()
        if call_id in self.rooms or self.granted.contains(call_id, now):
            self.ended.put(call_id, now)
            self.granted.discard(call_id)
        else:
            self.unseen_ended.put(call_id, now)

    def _forget(self, room: Room) -> None:
        if self.rooms.get(room.call_id) is room:
            del self.rooms[room.call_id]
            self.load_changed.set()

    async def close_all(self) -> None:
        for call_id in list(self.rooms):
            await self.close_room(call_id, CloseReason.SHUTDOWN)

    # ------------------------------------------------------------------ drain

    def start_drain(self) -> None:
        """SIGTERM: take no new session, ask for this node's calls to move, forward on."""
        if self.draining:
            return
        self.draining_since = time.monotonic()
        call_ids = sorted(self.rooms)
        log.warning(
            "media node %s draining: %d room(s) to move, at most %ss",
            self.settings.node_id,
            len(call_ids),
            self.settings.drain_s,
        )
        self.load_changed.set()  # the registry hears of it at once
        if call_ids:
            self._emit(MediaNodeDraining(node_id=self.settings.node_id, call_ids=call_ids))
        self._check_drained(self.draining_since)

    def _drain_pass(self, now: float) -> None:
        for room in list(self.rooms.values()):
            if room.abandoned(now, self.settings.stall_s):
                log.info("room %s: every participant left this draining node", room.call_id)
                self._spawn(self.close_room(room.call_id, CloseReason.MOVED), "close-moved-room")
        self._check_drained(now)

    def _check_drained(self, now: float) -> None:
        assert self.draining_since is not None
        open_rooms = [r for r in self.rooms.values() if r.is_open and r.participants]
        if not open_rooms:
            self.drained.set()
        elif now - self.draining_since >= self.settings.drain_s:
            log.warning(
                "media node %s: %d room(s) still in use after %ss of draining; leaving",
                self.settings.node_id,
                len(open_rooms),
                self.settings.drain_s,
            )
            self.drained.set()

    # ------------------------------------------------------------------ media events

    def media_failed(self, room: Room, reason: MediaFailure) -> None:
        """Once per room (the first cause wins): publish, then close every session.

        Not on a draining node: its calls are moving, their media is judged elsewhere."""
        if not room.is_open or self.draining:
            return
        room.set_state(RoomState.FAILED)
        self.failures[reason] += 1
        log.warning("room %s: media failed (%s)", room.call_id, reason)
        self._emit(
            CallMediaFailed(call_id=room.call_id, node_id=self.settings.node_id, reason=reason)
        )
        self._spawn(self.close_room(room.call_id, CloseReason.MEDIA_FAILED), "close-failed-room")

    def _emit(self, event: Event) -> None:
        key = event.type.value
        self.events_published[key] = self.events_published.get(key, 0) + 1
        self._spawn(self._publish(event), f"publish-{key}")

    def check(self, now: float) -> None:
        """One watchdog pass: ICE deadlines, media connected / stalled, bitrates."""
        self.granted.sweep(now)
        self.ended.sweep(now)
        self.unseen_ended.sweep(now)
        ice_timeout_s = self.settings.ice_timeout_s
        for room in list(self.rooms.values()):
            for participant in room.participants.values():
                participant.sample_rates(now)
            if not room.is_open:
                continue
            room.pick_speaker(now)
            for stale in room.pending_overdue(now, ice_timeout_s):
                if room.drop_pending(stale):
                    log.warning(
                        "room %s: %s's rejoin session %s brought no media; dropped",
                        room.call_id,
                        stale.user_id,
                        stale.session_id,
                    )
                    self._retire(stale)
        if self.draining:
            self._drain_pass(now)
            return
        for room in list(self.rooms.values()):
            if not room.is_open:
                continue
            overdue = room.ice_overdue(now, ice_timeout_s)
            if overdue is not None:
                log.warning(
                    "room %s: %s's session %s not connected after %ss (connection %s, ICE %s)",
                    room.call_id,
                    overdue.user_id,
                    overdue.session_id,
                    ice_timeout_s,
                    overdue.pc.connectionState,
                    overdue.pc.iceConnectionState,
                )
                if room.group is None:
                    self.media_failed(room, MediaFailure.ICE_FAILED)
                else:
                    self._drop_session(room, overdue, MediaFailure.ICE_FAILED)
            elif room.state is RoomState.WAITING and room.media_flowing():
                room.set_state(RoomState.CONNECTED)
                self._emit(CallMediaConnected(call_id=room.call_id, node_id=self.settings.node_id))
            elif room.stalled(now, room.waiting_timeout_s, ice_timeout_s):
                self.media_failed(room, MediaFailure.MEDIA_TIMEOUT)
            else:
                self._judge_links(room, now)

    def _judge_links(self, room: Room, now: float) -> None:
        for user_id, connection in room.links_changed(now, self.settings.stall_s):
            self._emit(
                CallMediaPeer(
                    call_id=room.call_id,
                    node_id=self.settings.node_id,
                    user=user_id,
                    connection=connection,
                )
            )
        for _ in range(len(room.participants)):
            gone = room.gone_past(now, self.settings.rejoin_grace_s)
            if gone is None or not room.is_open:
                return
            log.warning(
                "room %s: %s did not come back within %ss",
                room.call_id,
                gone,
                self.settings.rejoin_grace_s,
            )
            if room.group is None:
                self.media_failed(room, MediaFailure.MEDIA_TIMEOUT)
                return
            self._drop_session(room, room.participants[gone], MediaFailure.MEDIA_TIMEOUT)

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(WATCHDOG_PERIOD_S)
            try:
                self.check(time.monotonic())
            except Exception:
                log.exception("media watchdog pass failed")
