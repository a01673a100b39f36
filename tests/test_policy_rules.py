"""The rule, table-driven: every rule alone and in combination, with no I/O."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from services.policy.domain import (
    CALLER_SAFE_REASON,
    CallParties,
    CallSettings,
    Facts,
    ReportCheck,
    Verdict,
    check_report,
    decide,
)
from shared.contracts import DenialDetail, MediaKind, RejectReason

D = DenialDetail
R = RejectReason

# A and B where every rule passes: A premium, B messaged A, B follows A (default settings).
OK = Facts(
    caller="alice",
    callee="bob",
    caller_premium=True,
    callee_messaged_caller=True,
    callee_follows_caller=True,
)
OFF = CallSettings(enabled=False)
NOBODY = CallSettings(allow_address_book=False, allow_following=False, allow_verified=False)
ONLY_BOOK = CallSettings(allow_address_book=True, allow_following=False, allow_verified=False)
ONLY_FOLLOWING = CallSettings(allow_address_book=False, allow_following=True, allow_verified=False)
ONLY_VERIFIED = CallSettings(allow_address_book=False, allow_following=False, allow_verified=True)
ALL = CallSettings(allow_address_book=True, allow_following=True, allow_verified=True)

# (name, facts, require_premium, expected detail or None for allowed)
CASES: list[tuple[str, Facts, bool, DenialDetail | None]] = [
    ("all rules pass", OK, True, None),
    # --- each rule alone
    ("self call", replace(OK, callee="alice"), True, D.SELF_CALL),
    ("caller not premium", replace(OK, caller_premium=False), True, D.CALLER_NOT_PREMIUM),
    ("callee never messaged caller", replace(OK, callee_messaged_caller=False), True, D.NO_PRIOR_DM),
    ("callee has calls off", replace(OK, callee_settings=OFF), True, D.CALLS_DISABLED),
    ("callee follows nobody allowed", replace(OK, callee_follows_caller=False), True,
     D.NOT_ALLOWED_BY_SETTINGS),
    ("callee blocked caller", replace(OK, callee_blocked_caller=True), True,
     D.CALLEE_BLOCKED_CALLER),
    ("caller blocked callee", replace(OK, caller_blocked_callee=True), True,
     D.CALLER_BLOCKED_CALLEE),
    # --- the premium switch
    ("premium switch off lets a non-subscriber call",
     replace(OK, caller_premium=False), False, None),
    ("premium switch off: other rules still apply",
     replace(OK, caller_premium=False, callee_messaged_caller=False), False, D.NO_PRIOR_DM),
    ("premium switch off: blocks still apply",
     replace(OK, caller_premium=False, callee_blocked_caller=True), False,
     D.CALLEE_BLOCKED_CALLER),
    ("premium switch off: self call still refused",
     replace(OK, caller_premium=False, callee="alice"), False, D.SELF_CALL),
    # --- each way through B's settings
    ("address book only, caller in contacts",
     replace(OK, callee_settings=ONLY_BOOK, callee_follows_caller=False,
             caller_in_callee_contacts=True), True, None),
    ("address book only, callee follows caller but not in contacts",
     replace(OK, callee_settings=ONLY_BOOK), True, D.NOT_ALLOWED_BY_SETTINGS),
    ("following only, callee follows caller",
     replace(OK, callee_settings=ONLY_FOLLOWING), True, None),
    ("following only, caller in contacts but not followed",
     replace(OK, callee_settings=ONLY_FOLLOWING, callee_follows_caller=False,
             caller_in_callee_contacts=True), True, D.NOT_ALLOWED_BY_SETTINGS),
    ("verified only, caller verified",
     replace(OK, callee_settings=ONLY_VERIFIED, callee_follows_caller=False,
             caller_verified=True), True, None),
    ("verified only, caller not verified though followed",
     replace(OK, callee_settings=ONLY_VERIFIED), True, D.NOT_ALLOWED_BY_SETTINGS),
    ("default settings do not admit the merely verified",
     replace(OK, callee_follows_caller=False, caller_verified=True), True,
     D.NOT_ALLOWED_BY_SETTINGS),
    ("default settings admit a contact",
     replace(OK, callee_follows_caller=False, caller_in_callee_contacts=True), True, None),
    ("everything allowed, caller only verified",
     replace(OK, callee_settings=ALL, callee_follows_caller=False, caller_verified=True),
     True, None),
    ("nobody allowed, though contact, followed and verified",
     replace(OK, callee_settings=NOBODY, caller_in_callee_contacts=True, caller_verified=True),
     True, D.NOT_ALLOWED_BY_SETTINGS),
    ("calls off beats every allowance",
     replace(OK, callee_settings=CallSettings(enabled=False, allow_verified=True),
             caller_in_callee_contacts=True, caller_verified=True), True, D.CALLS_DISABLED),
    # --- combinations and precedence
    ("self call beats not premium", replace(OK, callee="alice", caller_premium=False), True,
     D.SELF_CALL),
    ("not premium beats no DM", replace(OK, caller_premium=False, callee_messaged_caller=False),
     True, D.CALLER_NOT_PREMIUM),
    ("no DM beats a block", replace(OK, callee_messaged_caller=False, callee_blocked_caller=True),
     True, D.NO_PRIOR_DM),
    ("blocked both ways", replace(OK, callee_blocked_caller=True, caller_blocked_callee=True),
     True, D.CALLEE_BLOCKED_CALLER),
    ("block beats calls off", replace(OK, callee_blocked_caller=True, callee_settings=OFF),
     True, D.CALLEE_BLOCKED_CALLER),
    ("caller's block beats settings",
     replace(OK, caller_blocked_callee=True, callee_follows_caller=False), True,
     D.CALLER_BLOCKED_CALLEE),
    ("block beats being followed, a contact and verified",
     replace(OK, callee_settings=ALL, caller_in_callee_contacts=True, caller_verified=True,
             callee_blocked_caller=True), True, D.CALLEE_BLOCKED_CALLER),
    # --- the defaults of users never seen before
    ("unknown caller and callee", Facts(caller="x", callee="y"), True, D.CALLER_NOT_PREMIUM),
    ("unknown users, premium switch off", Facts(caller="x", callee="y"), False, D.NO_PRIOR_DM),
    ("unknown callee who messaged a premium caller, no relation",
     Facts(caller="x", callee="y", caller_premium=True, callee_messaged_caller=True), True,
     D.NOT_ALLOWED_BY_SETTINGS),
    ("defaults: calls on, following allowed",
     Facts(caller="x", callee="y", caller_premium=True, callee_messaged_caller=True,
           callee_follows_caller=True), True, None),
    ("defaults: address book allowed",
     Facts(caller="x", callee="y", caller_premium=True, callee_messaged_caller=True,
           caller_in_callee_contacts=True), True, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("facts", "require_premium", "expected"),
    [pytest.param(f, p, e, id=name) for name, f, p, e in CASES],
)
def test_rule(facts: Facts, require_premium: bool, expected: DenialDetail | None) -> None:
    verdict = decide(facts, require_premium=require_premium)
    assert verdict.allowed is (expected is None)
    assert verdict.detail == expected
    if expected is None:
        assert verdict.reason is None
        assert verdict.media == (MediaKind.AUDIO, MediaKind.VIDEO)
    else:
        assert verdict.reason == CALLER_SAFE_REASON[expected]
        assert verdict.media == ()


def test_caller_is_never_told_about_blocks_calls_off_or_settings() -> None:
    hidden = {
        D.CALLS_DISABLED,
        D.NOT_ALLOWED_BY_SETTINGS,
        D.CALLEE_BLOCKED_CALLER,
        D.CALLER_BLOCKED_CALLEE,
    }
    assert set(CALLER_SAFE_REASON) == set(DenialDetail)
    for detail in hidden:
        assert CALLER_SAFE_REASON[detail] is R.CALLEE_UNAVAILABLE
    told = {CALLER_SAFE_REASON[d] for d in set(DenialDetail) - hidden}
    assert told == {R.SELF_CALL, R.CALLER_NOT_PREMIUM, R.NO_PRIOR_DM}


def test_the_rule_over_every_combination_matches_its_definition() -> None:
    """Exhaustive: all 2^12 combinations of the boolean facts against the rule as written."""
    names = [
        "self",
        "premium",
        "verified",
        "dm",
        "enabled",
        "book",
        "following",
        "allow_verified",
        "in_contacts",
        "follows",
        "callee_blocks",
        "caller_blocks",
    ]
    for bits in itertools.product((False, True), repeat=len(names)):
        f = dict(zip(names, bits, strict=True))
        for require_premium in (False, True):
            facts = Facts(
                caller="a",
                callee="a" if f["self"] else "b",
                caller_premium=f["premium"],
                caller_verified=f["verified"],
                callee_messaged_caller=f["dm"],
                callee_settings=CallSettings(
                    f["enabled"], f["book"], f["following"], f["allow_verified"]
                ),
                caller_in_callee_contacts=f["in_contacts"],
                callee_follows_caller=f["follows"],
                callee_blocked_caller=f["callee_blocks"],
                caller_blocked_callee=f["caller_blocks"],
            )
            may = (
                not f["self"]
                and (f["premium"] or not require_premium)
                and f["dm"]
                and f["enabled"]
                and (
                    (f["book"] and f["in_contacts"])
                    or (f["following"] and f["follows"])
                    or (f["allow_verified"] and f["verified"])
                )
                and not f["callee_blocks"]
                and not f["caller_blocks"]
            )
            verdict: Verdict = decide(facts, require_premium=require_premium)
            assert verdict.allowed is may, (f, require_premium, verdict)


ALICE_TO_BOB = CallParties(caller="alice", callee="bob")


@pytest.mark.parametrize(
    ("parties", "reporter", "reported", "expected"),
    [
        (ALICE_TO_BOB, "alice", "bob", ReportCheck.ALLOWED),
        (ALICE_TO_BOB, "bob", "alice", ReportCheck.ALLOWED),
        (ALICE_TO_BOB, "bob", "carol", ReportCheck.NOT_THE_OTHER_PARTY),
        (ALICE_TO_BOB, "alice", "alice", ReportCheck.NOT_THE_OTHER_PARTY),
        (ALICE_TO_BOB, "carol", "alice", ReportCheck.UNKNOWN_CALL),
        (ALICE_TO_BOB, "carol", "carol", ReportCheck.UNKNOWN_CALL),
        (None, "alice", "bob", ReportCheck.UNKNOWN_CALL),
    ],
)
def test_f7_a_report_is_checked_against_the_calls_parties(
    parties: CallParties | None, reporter: str, reported: str, expected: ReportCheck
) -> None:
    """Only a party of an authorized call, about the other; an outsider is told what a
    made-up call id gets, so nobody learns of other people's calls."""
    assert check_report(parties, reporter, reported) is expected
