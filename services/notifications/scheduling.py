"""Fair push scheduling and per-target circuit breakers (pure: no I/O, the clock is passed in).

Why: one instance sends at most ``push_concurrency`` requests at once. Without more, the
jobs run in the order they were queued, so one user with many slow targets fills every slot
and everyone else's pushes wait behind theirs. The worker (push.py) therefore puts the jobs
it has taken in a :class:`FairScheduler` and starts them from there:

- at most ``per_target`` requests in flight to one target (device) and ``per_user`` for one
  user's targets together, inside the instance's ``total``;
- users take turns (round robin over the users with a job that may start), and within one
  user an ``incoming_call`` goes before the rest;
- at most ``user_backlog`` jobs of one user (and ``target_backlog`` for one target) wait in
  memory; the worker puts the others back in the retry queue for a moment, without
  counting an attempt. So a flood from one user never fills the buffer the next user's job
  must get into, and no job waits here so long that another instance takes it over as if
  this one had died (``push_claim_idle_ms``).

A :class:`Breakers` entry per target opens after ``threshold`` timeouts in a row: for
``cooloff_s`` attempts to it are not made (the worker ends them as failed attempts, retried
or dead-lettered like any other, see push.py), then it half-opens and lets one trial
through; an answer closes it, another timeout opens it again.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


@dataclass(eq=False)
class Queued:
    """One job waiting in (or running from) the scheduler."""

    entry_id: str
    user: str
    target: str
    urgent: bool
    job: Any
    """The job itself (push.py's ``PushJob``, or None when it cannot be decoded)."""


@dataclass(frozen=True, slots=True)
class Limits:
    total: int
    per_user: int
    per_target: int
    user_backlog: int
    """Jobs of one user held in memory, waiting and running together."""
    target_backlog: int
    """Jobs for one target held in memory, waiting and running together."""
    backlog: int
    """Jobs held in memory in all."""


class FairScheduler:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._waiting: OrderedDict[str, deque[Queued]] = OrderedDict()
        self._known: set[str] = set()
        self._held_by_user: dict[str, int] = {}
        self._held_by_target: dict[str, int] = {}
        self._running_by_user: dict[str, int] = {}
        self._running_by_target: dict[str, int] = {}
        self.running = 0

    @property
    def held(self) -> int:
        """Jobs waiting or running."""
        return len(self._known)

    @property
    def room(self) -> int:
        """How many more jobs may be taken in."""
        return max(self.limits.backlog - self.held, 0)

    def knows(self, entry_id: str) -> bool:
        return entry_id in self._known

    def is_full(self, user: str, target: str) -> bool:
        """Whether the scheduler holds the most jobs it may for ``user`` or ``target``."""
        return (
            self._held_by_user.get(user, 0) >= self.limits.user_backlog
            or self._held_by_target.get(target, 0) >= self.limits.target_backlog
        )

    def offer(self, item: Queued) -> bool:
        """Takes a job in; False when it is held already (taken again by a reclaim)."""
        if item.entry_id in self._known:
            return False
        self._known.add(item.entry_id)
        self._held_by_user[item.user] = self._held_by_user.get(item.user, 0) + 1
        self._held_by_target[item.target] = self._held_by_target.get(item.target, 0) + 1
        queue = self._waiting.setdefault(item.user, deque())
        queue.append(item)
        return True

    def next(self) -> Queued | None:
        """The next job that may start now (counted as running), or None."""
        if self.running >= self.limits.total:
            return None
        for user in list(self._waiting):
            if self._running_by_user.get(user, 0) >= self.limits.per_user:
                continue
            queue = self._waiting[user]
            item = self._pick(queue)
            if item is None:
                continue
            queue.remove(item)
            if queue:
                self._waiting.move_to_end(user)  # the others go first next time
            else:
                del self._waiting[user]
            self._start(item)
            return item
        return None

    def done(self, item: Queued) -> None:
        """A job that :meth:`next` gave has ended."""
        self.running -= 1
        _decrement(self._running_by_user, item.user)
        _decrement(self._running_by_target, item.target)
        _decrement(self._held_by_user, item.user)
        _decrement(self._held_by_target, item.target)
        self._known.discard(item.entry_id)

    def _pick(self, queue: deque[Queued]) -> Queued | None:
        first: Queued | None = None
        for item in queue:
            if self._running_by_target.get(item.target, 0) >= self.limits.per_target:
                continue
            if item.urgent:
                return item
            if first is None:
                first = item
        return first

    def _start(self, item: Queued) -> None:
        self.running += 1
        self._running_by_user[item.user] = self._running_by_user.get(item.user, 0) + 1
        self._running_by_target[item.target] = self._running_by_target.get(item.target, 0) + 1


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


# --------------------------------------------------------------------------- breakers


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class _Breaker:
    timeouts: int = 0
    state: BreakerState = BreakerState.CLOSED
    open_until: float = 0.0
    trial_running: bool = False


@dataclass
class Breakers:
    """One circuit breaker per target, in this process."""

    threshold: int
    cooloff_s: float
    slack_s: float = 0.05
    """A trial asked for this close to the cool-off's end goes ahead: the retry that waited
    for the end is due by the wall clock in whole milliseconds while the breaker keeps
    monotonic time, so it can arrive a few milliseconds "early" and must not be turned away
    for that (it may be the job's last attempt)."""
    _by_target: dict[str, _Breaker] = field(default_factory=dict)

    def allow(self, target: str, now: float) -> float | None:
        """None when an attempt to ``target`` may go ahead; else how many seconds until
        the breaker lets a trial through."""
        breaker = self._by_target.get(target)
        if breaker is None or breaker.state is BreakerState.CLOSED:
            return None
        if breaker.state is BreakerState.OPEN:
            if now < breaker.open_until - self.slack_s:
                return breaker.open_until - now
            breaker.state = BreakerState.HALF_OPEN
        if breaker.trial_running:
            return self.cooloff_s  # one trial at a time; the others wait for its outcome
        breaker.trial_running = True
        return None

    def state(self, target: str) -> BreakerState:
        breaker = self._by_target.get(target)
        return BreakerState.CLOSED if breaker is None else breaker.state

    def timed_out(self, target: str, now: float) -> bool:
        """Records a timeout; True when it opened the breaker."""
        breaker = self._by_target.setdefault(target, _Breaker())
        breaker.timeouts += 1
        breaker.trial_running = False
        if breaker.state is BreakerState.HALF_OPEN or breaker.timeouts >= self.threshold:
            opened = breaker.state is not BreakerState.OPEN
            breaker.state = BreakerState.OPEN
            breaker.open_until = now + self.cooloff_s
            return opened
        return False

    def answered(self, target: str) -> None:
        """Records an attempt that did not time out: the breaker closes."""
        self._by_target.pop(target, None)

    def abandoned(self, target: str) -> None:
        """An allowed attempt that ended before its request was made (no verdict)."""
        breaker = self._by_target.get(target)
        if breaker is not None:
            breaker.trial_running = False
