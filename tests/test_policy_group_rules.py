"""The group call rule (PRODUCT.md "Group calls" rule 2), table-driven and pure: whom a
group call rings, the starter's own checks, and the cap on how many ring."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from services.policy.domain import (
    CALLER_SAFE_REASON,
    CallParties,
    CallSettings,
    GroupCallParties,
    GroupFacts,
    MemberFacts,
    NotRung,
    ReportCheck,
    check_report,
    decide_group,
    ring_check,
)
from shared.contracts import DenialDetail, MediaKind, RejectReason

N = NotRung
# M posted in the group and has every default: rung through allow_from.groups alone.
POSTED = MemberFacts(user="bob", posted=True)
NO_GROUPS = CallSettings(allow_groups=False)
NOTHING = CallSettings(
    allow_address_book=False, allow_following=False, allow_verified=False, allow_groups=False
)
ONLY_VERIFIED = replace(NOTHING, allow_verified=True)

# (name, member facts, starter verified, expected NotRung or None for rung)
CASES: list[tuple[str, MemberFacts, bool, NotRung | None]] = [
    ("posted, defaults: rung through allow_from.groups", POSTED, False, None),
    ("never posted", replace(POSTED, posted=False), False, N.NO_GROUP_POST),
    (
        "never posted, though every setting allows the starter",
        replace(POSTED, posted=False, follows_starter=True, starter_in_contacts=True),
        True,
        N.NO_GROUP_POST,
    ),
    ("no longer a member", replace(POSTED, member=False), False, N.NOT_A_MEMBER),
    ("calls off", replace(POSTED, settings=CallSettings(enabled=False)), False, N.CALLS_DISABLED),
    ("member blocked the starter", replace(POSTED, blocked_starter=True), False,
     N.CALLEE_BLOCKED_CALLER),
    ("starter blocked the member", replace(POSTED, starter_blocked=True), False,
     N.CALLER_BLOCKED_CALLEE),
    (
        "a block beats allow_from.groups and every allowance",
        replace(POSTED, blocked_starter=True, follows_starter=True, starter_in_contacts=True),
        True,
        N.CALLEE_BLOCKED_CALLER,
    ),
    ("groups off, no 1:1 allowance", replace(POSTED, settings=NO_GROUPS), False,
     N.NOT_ALLOWED_BY_SETTINGS),
    ("groups off, member follows the starter",
     replace(POSTED, settings=NO_GROUPS, follows_starter=True), False, None),
    ("groups off, starter in the member's address book",
     replace(POSTED, settings=NO_GROUPS, starter_in_contacts=True), False, None),
    ("groups off, following not allowed though the member follows",
     replace(POSTED, settings=replace(NOTHING, allow_address_book=True), follows_starter=True),
     False, N.NOT_ALLOWED_BY_SETTINGS),
    ("verified only, starter verified", replace(POSTED, settings=ONLY_VERIFIED), True, None),
    ("verified only, starter not verified", replace(POSTED, settings=ONLY_VERIFIED), False,
     N.NOT_ALLOWED_BY_SETTINGS),
    ("groups on alone lets an unverified stranger of the group through",
     replace(POSTED, settings=replace(NOTHING, allow_groups=True)), False, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("member", "starter_verified", "expected"),
    [pytest.param(m, v, e, id=name) for name, m, v, e in CASES],
)
def test_per_invitee_rule(
    member: MemberFacts, starter_verified: bool, expected: NotRung | None
) -> None:
    assert ring_check(member, starter_verified=starter_verified) is expected
    facts = GroupFacts("g", "alice", True, True, starter_verified, invitees=(member,))
    verdict = decide_group(facts)
    assert verdict.allowed and verdict.reason is None and verdict.detail is None
    assert verdict.ring == (() if expected else ("bob",))
    assert verdict.not_rung == ((("bob", expected),) if expected else ())


def test_the_per_invitee_rule_over_every_combination_matches_its_definition() -> None:
    names = [
        "member", "posted", "enabled", "book", "following", "allow_verified", "groups",
        "in_contacts", "follows", "verified", "member_blocks", "starter_blocks",
    ]  # fmt: skip
    for bits in itertools.product((False, True), repeat=len(names)):
        f = dict(zip(names, bits, strict=True))
        member = MemberFacts(
            user="m",
            member=f["member"],
            posted=f["posted"],
            settings=CallSettings(
                f["enabled"], f["book"], f["following"], f["allow_verified"], f["groups"]
            ),
            starter_in_contacts=f["in_contacts"],
            follows_starter=f["follows"],
            blocked_starter=f["member_blocks"],
            starter_blocked=f["starter_blocks"],
        )
        rung = (
            f["member"]
            and f["posted"]
            and f["enabled"]
            and not f["member_blocks"]
            and not f["starter_blocks"]
            and (
                f["groups"]
                or (f["book"] and f["in_contacts"])
                or (f["following"] and f["follows"])
                or (f["allow_verified"] and f["verified"])
            )
        )
        assert (ring_check(member, starter_verified=f["verified"]) is None) is rung, f


def test_the_starter_must_be_a_member_and_premium_while_required() -> None:
    invitees = (POSTED,)
    outsider = decide_group(
        GroupFacts("g", "alice", False, starter_premium=True, invitees=invitees)
    )
    assert (outsider.allowed, outsider.detail) == (False, DenialDetail.NOT_A_MEMBER)
    assert outsider.reason is CALLER_SAFE_REASON[DenialDetail.NOT_A_MEMBER]
    assert outsider.ring == () and outsider.not_rung == () and outsider.media == ()

    free = GroupFacts("g", "alice", True, starter_premium=False, invitees=invitees)
    rejected = decide_group(free)
    assert (rejected.allowed, rejected.reason, rejected.detail) == (
        False,
        RejectReason.CALLER_NOT_PREMIUM,
        DenialDetail.CALLER_NOT_PREMIUM,
    )
    assert rejected.ring == ()
    # the premium switch off: a non-subscriber starts it, the members' rule still applies
    opened = decide_group(free, require_premium=False)
    assert opened.allowed and opened.ring == ("bob",)
    assert opened.media == (MediaKind.AUDIO, MediaKind.VIDEO)
    off = decide_group(
        replace(free, invitees=(replace(POSTED, settings=CallSettings(enabled=False)),)),
        require_premium=False,
    )
    assert off.allowed and off.ring == () and off.not_rung == (("bob", N.CALLS_DISABLED),)


def test_the_starter_is_never_told_why_a_member_is_not_rung() -> None:
    """The verdict's caller-safe part is the same whichever rule kept a member silent."""
    seen = set()
    for _, member, verified, expected in CASES:
        if expected is None:
            continue
        facts = GroupFacts("g", "alice", True, True, verified, invitees=(member,))
        v = decide_group(facts)
        seen.add((v.allowed, v.reason, v.detail, v.ring, v.media))
    assert seen == {(True, None, None, (), (MediaKind.AUDIO, MediaKind.VIDEO))}


def test_a_mixed_group_rings_the_eligible_in_the_listed_order() -> None:
    invitees = (
        MemberFacts("bob", posted=True),
        MemberFacts("carol", posted=False),
        MemberFacts("dave", posted=True, settings=CallSettings(enabled=False)),
        MemberFacts("alice", posted=True),  # the starter listed by mistake: skipped
        MemberFacts("erin", posted=True, settings=NO_GROUPS, follows_starter=True),
        MemberFacts("frank", posted=True, starter_blocked=True),
    )
    v = decide_group(GroupFacts("g", "alice", True, True, invitees=invitees))
    assert v.ring == ("bob", "erin")
    assert dict(v.not_rung) == {
        "carol": N.NO_GROUP_POST,
        "dave": N.CALLS_DISABLED,
        "frank": N.CALLER_BLOCKED_CALLEE,
    }


@pytest.mark.parametrize("maximum", [2, 3, 16])
def test_at_most_max_minus_one_invitees_ring(maximum: int) -> None:
    invitees = tuple(
        MemberFacts(f"m{i:02}", posted=i % 3 != 0) for i in range(20)
    )  # every third never posted
    v = decide_group(GroupFacts("g", "s", True, True, invitees=invitees), max_participants=maximum)
    eligible = [m.user for m in invitees if m.posted]
    assert v.ring == tuple(eligible[: maximum - 1])
    full = [u for u, why in v.not_rung if why is N.CALL_FULL]
    assert full == eligible[maximum - 1 :]
    assert len(v.ring) + len(v.not_rung) == len(invitees)


def test_a_group_call_report_is_checked_against_its_parties() -> None:
    parties = GroupCallParties(frozenset({"alice", "bob", "erin"}))
    assert check_report(parties, "bob", "alice") is ReportCheck.ALLOWED
    assert check_report(parties, "bob", "erin") is ReportCheck.ALLOWED
    assert check_report(parties, "bob", "bob") is ReportCheck.NOT_THE_OTHER_PARTY
    assert check_report(parties, "bob", "frank") is ReportCheck.NOT_THE_OTHER_PARTY
    assert check_report(parties, "frank", "alice") is ReportCheck.UNKNOWN_CALL
    # 1:1 as before
    assert check_report(CallParties("alice", "bob"), "bob", "alice") is ReportCheck.ALLOWED
