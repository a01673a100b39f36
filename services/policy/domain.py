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

Reports (:func:`check_report`): a call may be reported only by one of its parties, about
the other, and only a call policy authorized (the only calls that reach a callee).
"""

from __future__ import annotations

from dataclasses import dataclass
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


class ReportCheck(StrEnum):
    """Whether a user may report a call about a user, and if not, why."""

    ALLOWED = "allowed"
    UNKNOWN_CALL = "unknown_call"
    """No call policy authorized has this id, or the reporter is not one of its parties:
    alike to the reporter, so nobody learns of other people's calls."""
    NOT_THE_OTHER_PARTY = "not_the_other_party"
    """The reporter is a party, but the reported user is not the other one."""


def check_report(parties: CallParties | None, reporter: str, reported_user: str) -> ReportCheck:
    """A report is accepted only from a party of a call that happened, about the other."""
    if parties is None or reporter not in (parties.caller, parties.callee):
        return ReportCheck.UNKNOWN_CALL
    other = parties.callee if reporter == parties.caller else parties.caller
    if reported_user != other:
        return ReportCheck.NOT_THE_OTHER_PARTY
    return ReportCheck.ALLOWED
