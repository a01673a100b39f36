"""Demo users whose relations show every rule, and a demo group to try group calls in
(``make run`` calls :func:`seed`).

Facts go through policy's platform API with a platform-scope token; users' own settings
through ``PUT /v1/settings`` with their own token. Every write is idempotent, so seeding
twice changes nothing. docs/policy.md lists the users and what each pair shows.

``python -m tools.seed [policy_url]`` seeds a running policy (default http://127.0.0.1:8002).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import httpx

from shared.auth import issue_token
from shared.settings import CommonSettings

SEED_IDENTITY = "dmcall-seed"


@dataclass(frozen=True)
class DemoUser:
    name: str
    premium: bool
    verified: bool
    about: str


USERS = (
    DemoUser("alice", True, True, "premium and verified: can call bob and erin"),
    DemoUser("bob", True, False, "premium; messaged and follows alice, so alice can call him"),
    DemoUser("carol", False, False, "follows alice but never messaged her"),
    DemoUser("dave", False, False, "messaged and follows alice, but has calls off"),
    DemoUser("erin", False, False, "takes calls only from verified users"),
    DemoUser("frank", False, False, "not a subscriber; bob messaged and follows him"),
)

# (sender, recipient): sender sent recipient a DM, so recipient may call sender.
DMS = (
    ("bob", "alice"),
    ("alice", "bob"),
    ("dave", "alice"),
    ("erin", "alice"),
    ("erin", "bob"),
    ("bob", "frank"),
)

# (user, other): user follows other, so other passes user's "following" allowance.
FOLLOWS = (
    ("bob", "alice"),
    ("alice", "bob"),
    ("carol", "alice"),
    ("dave", "alice"),
    ("erin", "alice"),
    ("erin", "bob"),
    ("bob", "frank"),
)

SETTINGS: dict[str, dict[str, object]] = {
    "dave": {"enabled": False},
    "erin": {
        "enabled": True,
        "allow_from": {"address_book": False, "following": False, "verified": True},
    },
}

# What the demo shows: (caller, callee, allowed, caller-safe reason, why).
EXPECTED = (
    ("alice", "bob", True, None, "bob messaged alice and follows her"),
    ("bob", "alice", True, None, "alice messaged bob and follows him"),
    ("alice", "carol", False, "no_prior_dm", "carol never messaged alice"),
    ("alice", "dave", False, "callee_unavailable", "dave has calls off"),
    ("alice", "erin", True, None, "erin takes verified callers; alice is verified"),
    ("bob", "erin", False, "callee_unavailable", "bob is not verified (erin follows him)"),
    ("frank", "bob", False, "caller_not_premium", "frank is not a subscriber"),
    ("alice", "alice", False, "self_call", "nobody calls themself"),
)


# The demo group conversation: its members, and who posted in it (frank never did).
GROUP = "friends"
GROUP_MEMBERS = ("alice", "bob", "erin", "frank")
GROUP_POSTERS = ("alice", "bob", "erin")

# What a group call in it shows: (starter, caller-safe reason, who rings, why).
GROUP_EXPECTED: tuple[tuple[str, str | None, list[str], str], ...] = (
    ("alice", None, ["bob", "erin"], "frank never posted in the group, so he is not rung"),
    ("bob", None, ["alice", "erin"], "erin takes only verified callers, but allows her groups"),
    ("erin", "caller_not_premium", [], "erin is not a subscriber"),
)


def _check(response: httpx.Response) -> None:
    if not response.is_success:
        raise RuntimeError(
            f"seeding failed: {response.request.method} {response.request.url} -> "
            f"{response.status_code} {response.text}"
        )


def seed(policy_url: str) -> None:
    """Create (or refresh) the demo users on the policy service at ``policy_url``."""
    settings = CommonSettings()
    platform = {"Authorization": f"Bearer {issue_token(settings, SEED_IDENTITY, scope='platform')}"}
    with httpx.Client(base_url=policy_url.rstrip("/"), headers=platform, timeout=10.0) as http:
        for user in USERS:
            body = {"premium": user.premium, "verified": user.verified}
            _check(http.put(f"/v1/platform/users/{user.name}", json=body))
        for sender, recipient in DMS:
            _check(http.post("/v1/platform/dms", json={"sender": sender, "recipient": recipient}))
        for user_id, other in FOLLOWS:
            _check(http.put(f"/v1/platform/users/{user_id}/following/{other}"))
        for name, call_settings in SETTINGS.items():
            own = {"Authorization": f"Bearer {issue_token(settings, name)}"}
            _check(http.put("/v1/settings", json=call_settings, headers=own))
        for member in GROUP_MEMBERS:
            _check(http.put(f"/v1/platform/groups/{GROUP}/members/{member}"))
        for sender in GROUP_POSTERS:
            _check(http.post(f"/v1/platform/groups/{GROUP}/messages", json={"sender": sender}))


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8002"
    os.environ.setdefault("DMCALL_ENV", "development")  # the demo users use development tokens
    seed(url)
    print(f"seeded {len(USERS)} demo users on {url}: " + ", ".join(u.name for u in USERS))
    print(f"and the group {GROUP!r}: " + ", ".join(GROUP_MEMBERS))


if __name__ == "__main__":
    main()
