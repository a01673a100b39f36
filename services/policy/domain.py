"""The rule: who may call whom, as one pure function over the facts (no I/O).

A may call B only if, in this order of checks:

1. A is not B (``self_call``);
2. A is premium, while the deployment requires it (``caller_not_premium``);
3. B has sent at least one DM to A (``no_prior_dm``);
4. neither has blocked the other (``callee_blocked_caller`` / ``caller_blocked_callee``);
5. B has calls enabled (``calls_disabled``);
6. B allows A through at least one of: address book (A is in B's contacts), following
   (B follows A), verified (A is verified) (``not_allowed_by_settings``).

The caller is told only a :class:`RejectReason`; 4, 5 and 6 all read as
``callee_unavailable``, so a caller never learns whether they were blocked or merely
not allowed. The :class:`DenialDetail` says which rule denied, for logs, traces and
support. The defaults of :class:`Facts` are those of a user never seen before: calls on,
address book and following allowed, not premium, not verified, no DMs, no blocks.

Group calls (:func:`decide_group`, PRODUCT.md "Group calls" rule 2): the starter S of a
call in group G must be a member (``not_a_member``, told as ``no_prior_dm``: the
conversation does not let them call, a fact S sees themself) and premium, while the
deployment requires it. Each other member M is rung (:func:`ring_check`) only if: M is a
member still; M has posted in G at least once (the group's "has DMed you"); no block
either way; M has calls on; M's settings allow S (address book, following, verified, as
for 1:1) or M allows calls from their groups (``allow_from.groups``). Why M is not rung is
a :class:`NotRung`, for logs, traces and support only: the starter learns who rings, never
why someone does not.

Reports (:func:`check_report`): a call may be reported only by one of its parties, about
another, and only a call policy authorized (the only calls that reach a callee). A group
call's parties are its starter, the invitees it rang and anyone who joined it.

Platform facts (:func:`check_not_future`): one dated further in the future than the
allowed clock skew is refused, from the API and from the bus alike; applied, it would
freeze its edge against every later change.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from shared.contracts import DenialDetail, MediaKind, RejectReason

ALL_MEDIA: tuple[MediaKind, ...] = (MediaKind.AUDIO, MediaKind.VIDEO)


@dataclass(frozen=True, slots=True)
class CallSettings:
    """A callee's own choice of who may call them (CONTRACT.md ``CallSettings``)."""

    enabled: bool = True
    allow_address_book: bool = True
    allow_following: bool = True
    allow_verified: bool = False
    allow_groups: bool = True
    """Members of a group I am in may ring me in a group call (if I posted there)."""


DEFAULT_SETTINGS = CallSettings()


@dataclass(frozen=True, slots=True)
class Facts:
    """Everything the rule looks at for one caller (A) and one callee (B)."""

    caller: str
    callee: str
    caller_premium: bool = False
    caller_verified: bool = False
    callee_messaged_caller: bool = False
    """B has sent at least one DM to A."""
    callee_settings: CallSettings = DEFAULT_SETTINGS
    caller_in_callee_contacts: bool = False
    """A is in B's address book."""
    callee_follows_caller: bool = False
    callee_blocked_caller: bool = False
    """B blocked A: on the platform, from a call, or by reporting A."""
    caller_blocked_callee: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome: allowed, or denied with the caller-safe reason and the real one."""

    allowed: bool
    reason: RejectReason | None = None
    detail: DenialDetail | None = None

    @property
    def media(self) -> tuple[MediaKind, ...]:
        return ALL_MEDIA if self.allowed else ()


ALLOWED = Verdict(allowed=True)

# The one place that maps the real reason to what a caller may be told.
CALLER_SAFE_REASON: dict[DenialDetail, RejectReason] = {
    DenialDetail.SELF_CALL: RejectReason.SELF_CALL,
    DenialDetail.CALLER_NOT_PREMIUM: RejectReason.CALLER_NOT_PREMIUM,
    DenialDetail.NO_PRIOR_DM: RejectReason.NO_PRIOR_DM,
    DenialDetail.CALLEE_BLOCKED_CALLER: RejectReason.CALLEE_UNAVAILABLE,
    DenialDetail.CALLER_BLOCKED_CALLEE: RejectReason.CALLEE_UNAVAILABLE,
    DenialDetail.CALLS_DISABLED: RejectReason.CALLEE_UNAVAILABLE,
    DenialDetail.NOT_ALLOWED_BY_SETTINGS: RejectReason.CALLEE_UNAVAILABLE,
    # A group call's starter who is not in the group: something they can see themselves
    # (like "never DMed you"); signaling refuses them at placement already (404), so this
    # answers only a membership removed between placement and the verdict.
    DenialDetail.NOT_A_MEMBER: RejectReason.NO_PRIOR_DM,
}

_DENIALS = {detail: Verdict(False, reason, detail) for detail, reason in CALLER_SAFE_REASON.items()}


def deny(detail: DenialDetail) -> Verdict:
    return _DENIALS[detail]


def decide(facts: Facts, *, require_premium: bool = True) -> Verdict:
    """May ``facts.caller`` call ``facts.callee`` now? See the module docstring."""
    if facts.caller == facts.callee:
        return _DENIALS[DenialDetail.SELF_CALL]
    if require_premium and not facts.caller_premium:
        return _DENIALS[DenialDetail.CALLER_NOT_PREMIUM]
    if not facts.callee_messaged_caller:
        return _DENIALS[DenialDetail.NO_PRIOR_DM]
    if facts.callee_blocked_caller:
        return _DENIALS[DenialDetail.CALLEE_BLOCKED_CALLER]
    if facts.caller_blocked_callee:
        return _DENIALS[DenialDetail.CALLER_BLOCKED_CALLEE]
    settings = facts.callee_settings
    if not settings.enabled:
        return _DENIALS[DenialDetail.CALLS_DISABLED]
    if (
        (settings.allow_address_book and facts.caller_in_callee_contacts)
        or (settings.allow_following and facts.callee_follows_caller)
        or (settings.allow_verified and facts.caller_verified)
    ):
        return ALLOWED
    return _DENIALS[DenialDetail.NOT_ALLOWED_BY_SETTINGS]


# --------------------------------------------------------------------------- reports


@dataclass(frozen=True, slots=True)
class CallParties:
    """The two parties of a call policy authorized (the only calls that reach a callee)."""

    caller: str
    callee: str


@dataclass(frozen=True, slots=True)
class GroupCallParties:
    """The parties of a group call policy authorized: its starter, the invitees it rang,
    and every member who joined it (signaling's ``call_participant_joined``)."""

    users: frozenset[str]


class ReportCheck(StrEnum):
    """Whether a user may report a call about a user, and if not, why."""

    ALLOWED = "allowed"
    UNKNOWN_CALL = "unknown_call"
    """No call policy authorized has this id, or the reporter is not one of its parties:
    alike to the reporter, so nobody learns of other people's calls."""
    NOT_THE_OTHER_PARTY = "not_the_other_party"
    """The reporter is a party, but the reported user is not another one."""


def check_report(
    parties: CallParties | GroupCallParties | None, reporter: str, reported_user: str
) -> ReportCheck:
    """A report is accepted only from a party of a call that happened, about another."""
    if isinstance(parties, GroupCallParties):
        if reporter not in parties.users:
            return ReportCheck.UNKNOWN_CALL
        if reported_user == reporter or reported_user not in parties.users:
            return ReportCheck.NOT_THE_OTHER_PARTY
        return ReportCheck.ALLOWED
    if parties is None or reporter not in (parties.caller, parties.callee):
        return ReportCheck.UNKNOWN_CALL
    other = parties.callee if reporter == parties.caller else parties.caller
    if reported_user != other:
        return ReportCheck.NOT_THE_OTHER_PARTY
    return ReportCheck.ALLOWED


# --------------------------------------------------------------------------- platform facts


class FactFromTheFuture(ValueError):
    """A fact dated beyond the allowed clock skew: refused rather than frozen in place."""


def check_not_future(at: datetime, *, now: datetime, max_skew_s: int) -> None:
    """Raises :class:`FactFromTheFuture` for a fact dated more than ``max_skew_s`` after
    ``now`` (both aware datetimes)."""
    if at > now + timedelta(seconds=max_skew_s):
        raise FactFromTheFuture(
            f"occurred_at {at.isoformat()} is more than {max_skew_s}s in the future"
        )


# --------------------------------------------------------------------------- group calls


class NotRung(StrEnum):
    """Why a member of the group is not rung (logs, traces, support; never the starter)."""

    NOT_A_MEMBER = "not_a_member"
    """Listed as an invitee, but no longer a member when policy decided."""
    NO_GROUP_POST = "no_group_post"
    """Never posted in the group."""
    CALLEE_BLOCKED_CALLER = "callee_blocked_caller"
    """The member blocked the starter (on the platform, from calls, or by a report)."""
    CALLER_BLOCKED_CALLEE = "caller_blocked_callee"
    CALLS_DISABLED = "calls_disabled"
    NOT_ALLOWED_BY_SETTINGS = "not_allowed_by_settings"
    """Neither the 1:1 allowances nor ``allow_from.groups`` let the starter through."""
    CALL_FULL = "call_full"
    """Eligible, but the call already rings GROUP_CALL_MAX_PARTICIPANTS - 1 members."""


@dataclass(frozen=True, slots=True)
class MemberFacts:
    """What the per-invitee rule reads about one member M, towards the starter S."""

    user: str
    member: bool = True
    posted: bool = False
    """M has posted in the group at least once."""
    settings: CallSettings = DEFAULT_SETTINGS
    starter_in_contacts: bool = False
    """S is in M's address book."""
    follows_starter: bool = False
    blocked_starter: bool = False
    """M blocked S: on the platform, from a call, or by reporting S."""
    starter_blocked: bool = False
    """S blocked M (platform or call block)."""


@dataclass(frozen=True, slots=True)
class GroupFacts:
    """Everything a group call's verdict reads: the starter and each invitee."""

    group: str
    starter: str
    starter_member: bool
    starter_premium: bool = False
    starter_verified: bool = False
    invitees: tuple[MemberFacts, ...] = ()
    """In the order the call lists them (signaling: sorted by user id)."""


@dataclass(frozen=True, slots=True)
class GroupVerdict:
    """A group call allowed (with whom to ring) or rejected (caller-safe reason + real)."""

    allowed: bool
    reason: RejectReason | None = None
    detail: DenialDetail | None = None
    ring: tuple[str, ...] = ()
    not_rung: tuple[tuple[str, NotRung], ...] = ()
    """Each invitee not rung and why: never for the starter."""

    @property
    def media(self) -> tuple[MediaKind, ...]:
        return ALL_MEDIA if self.allowed else ()


def ring_check(m: MemberFacts, *, starter_verified: bool) -> NotRung | None:
    """Is member ``m`` rung when the starter calls the group? None: rung; else why not."""
    if not m.member:
        return NotRung.NOT_A_MEMBER
    if not m.posted:
        return NotRung.NO_GROUP_POST
    if m.blocked_starter:
        return NotRung.CALLEE_BLOCKED_CALLER
    if m.starter_blocked:
        return NotRung.CALLER_BLOCKED_CALLEE
    s = m.settings
    if not s.enabled:
        return NotRung.CALLS_DISABLED
    if (
        s.allow_groups
        or (s.allow_address_book and m.starter_in_contacts)
        or (s.allow_following and m.follows_starter)
        or (s.allow_verified and starter_verified)
    ):
        return None
    return NotRung.NOT_ALLOWED_BY_SETTINGS


def decide_group(
    facts: GroupFacts, *, require_premium: bool = True, max_participants: int = 16
) -> GroupVerdict:
    """May the starter start a call in the group, and whom does it ring?

    At most ``max_participants - 1`` invitees are rung (the starter is the other one):
    the first eligible ones in the order of ``facts.invitees``; the rest are
    :attr:`NotRung.CALL_FULL` (they can still join while there is room)."""
    if not facts.starter_member:
        return GroupVerdict(
            False, CALLER_SAFE_REASON[DenialDetail.NOT_A_MEMBER], DenialDetail.NOT_A_MEMBER
        )
    if require_premium and not facts.starter_premium:
        detail = DenialDetail.CALLER_NOT_PREMIUM
        return GroupVerdict(False, CALLER_SAFE_REASON[detail], detail)
    ring: list[str] = []
    not_rung: list[tuple[str, NotRung]] = []
    room = max(0, max_participants - 1)
    for m in facts.invitees:
        if m.user == facts.starter or m.user in ring:
            continue
        why = ring_check(m, starter_verified=facts.starter_verified)
        if why is None and len(ring) >= room:
            why = NotRung.CALL_FULL
        if why is None:
            ring.append(m.user)
        else:
            not_rung.append((m.user, why))
    return GroupVerdict(True, ring=tuple(ring), not_rung=tuple(not_rung))
