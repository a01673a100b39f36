"""The media node's offer checks and call memory, without I/O.

- F13: which ICE candidates an offer keeps (``services.media.sdp.CandidateRules``).
- F18: what an offer must carry for aiortc to connect it.
- F1: a node records the end only of calls it knows of, and forgets them by time.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Coroutine, Sequence
from typing import Any

import pytest

from services.media.expiring import ExpiringSet
from services.media.room import CloseReason
from services.media.rooms import Refusal, Rooms, SessionRefused
from services.media.sdp import BadOffer, CandidateRules, check_offer
from services.media.settings import MediaSettings
from shared.auth import MediaGrant
from shared.contracts import Event
from shared.settings import Environment

FINGERPRINT = "sha-256 " + ":".join(["AB"] * 32)


def offer(*, session: str = "", audio: str | None = None, candidates: Sequence[str] = ()) -> str:
    """An aiortc-like offer: one audio section, with ``candidates`` (addresses)."""
    media = (
        audio
        if audio is not None
        else (
            "a=ice-ufrag:abcd\r\na=ice-pwd:0123456789abcdefghijkl\r\n"
            f"a=fingerprint:{FINGERPRINT}\r\na=setup:actpass\r\n"
        )
    )
    lines = "".join(
        f"a=candidate:{i} 1 udp {2130706431 - i} {address} {40000 + i} typ host\r\n"
        for i, address in enumerate(candidates)
    )
    return (
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
        f"{session}"
        "m=audio 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=rtcp-mux\r\n"
        "a=rtpmap:96 opus/48000/2\r\n"
        f"{lines}a=end-of-candidates\r\n{media}"
    )


def kept(sdp: str) -> list[str]:
    return [line.split()[4] for line in sdp.splitlines() if line.startswith("a=candidate:")]


PUBLIC_ONLY = CandidateRules(networks=(), max_candidates=32)


def media_settings(**overrides: Any) -> MediaSettings:
    """Settings from the arguments, whatever this process's environment says."""
    values: dict[str, Any] = {
        "environment": Environment.TEST,
        "auth_jwt_secret": "j" * 40,
        "media_token_secret": "m" * 40,
        "node_id": "node-a",
    }
    return MediaSettings(**{**values, **overrides})


# ---------------------------------------------------------------------- F18


@pytest.mark.parametrize(
    ("media", "says"),
    [
        ("a=ice-pwd:x\r\na=fingerprint:" + FINGERPRINT + "\r\na=setup:actpass\r\n", "ice-ufrag"),
        ("a=ice-ufrag:x\r\na=fingerprint:" + FINGERPRINT + "\r\na=setup:actpass\r\n", "ice-pwd"),
        ("a=ice-ufrag:x\r\na=ice-pwd:y\r\na=setup:actpass\r\n", "a=fingerprint"),
        (
            "a=ice-ufrag:x\r\na=ice-pwd:y\r\na=fingerprint:md5 AB:CD\r\na=setup:actpass\r\n",
            "verify",
        ),
        (
            "a=ice-ufrag:x\r\na=ice-pwd:y\r\na=fingerprint:sha-256\r\na=setup:actpass\r\n",
            "malformed",
        ),
        ("a=ice-ufrag:x\r\na=ice-pwd:y\r\na=fingerprint:" + FINGERPRINT + "\r\n", "a=setup"),
        (
            "a=ice-ufrag:x\r\na=ice-pwd:y\r\na=fingerprint:" + FINGERPRINT + "\r\na=setup:x\r\n",
            "a=setup",
        ),
    ],
)
def test_f18_an_offer_aiortc_cannot_connect_is_a_bad_offer(media: str, says: str) -> None:
    with pytest.raises(BadOffer, match=says):
        check_offer(offer(audio=media), PUBLIC_ONLY)


def test_f18_session_level_credentials_and_fingerprint_count_for_every_section() -> None:
    session = f"a=ice-ufrag:abcd\r\na=ice-pwd:secretsecret\r\na=fingerprint:{FINGERPRINT}\r\n"
    checked = check_offer(offer(session=session, audio="a=setup:active\r\n"), PUBLIC_ONLY)
    assert checked.dropped == 0


@pytest.mark.parametrize("body", ["hello", "v=0\r\n", "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\n"])
def test_f18_not_an_offer(body: str) -> None:
    with pytest.raises(BadOffer):
        check_offer(body, PUBLIC_ONLY)


def test_f18_a_malformed_candidate_is_a_bad_offer() -> None:
    sdp = offer(candidates=["203.0.113.9"]).replace(" typ host", " host")
    with pytest.raises(BadOffer, match="malformed ICE candidate"):
        check_offer(sdp, PUBLIC_ONLY)


# ---------------------------------------------------------------------- F13


def test_f13_only_public_candidates_are_kept_by_default_in_production() -> None:
    addresses = [
        "8.8.8.8",  # public
        "2606:4700:4700::1111",  # public IPv6
        "127.0.0.1",  # loopback
        "::1",
        "::ffff:127.0.0.1",  # loopback, IPv4-mapped
        "169.254.169.254",  # link-local (cloud metadata)
        "fe80::1",
        "10.1.2.3",  # private
        "172.16.0.1",
        "192.168.1.10",
        "100.64.0.1",  # carrier-grade NAT
        "fd00::2",  # unique local
        "0.0.0.0",
        "224.0.0.251",  # multicast
        "255.255.255.255",
        "0d6a3c2e-1b4f-4a5e-9c1d-2f3e4a5b6c7d.local",  # mDNS
        "metadata.google.internal",  # a host name
    ]
    rules = media_settings(environment=Environment.PRODUCTION).candidate_rules
    assert rules.networks == ()
    checked = check_offer(offer(candidates=addresses), rules)
    assert kept(checked.sdp) == ["8.8.8.8", "2606:4700:4700::1111"]
    assert checked.dropped == len(addresses) - 2
    # Candidates were dropped: the node waits for the party's checks instead of failing
    # at once when no pair is left.
    assert "a=end-of-candidates" not in checked.sdp


def test_f13_configured_networks_are_allowed_and_development_allows_every_address() -> None:
    rules = CandidateRules(
        networks=(ipaddress.IPv4Network("10.0.0.0/8"), ipaddress.IPv6Network("fd00::/8")),
        max_candidates=32,
    )
    checked = check_offer(offer(candidates=["10.1.2.3", "fd00::2", "192.168.1.1"]), rules)
    assert kept(checked.sdp) == ["10.1.2.3", "fd00::2"]

    for environment in (Environment.DEVELOPMENT, Environment.TEST):
        rules = media_settings(environment=environment).candidate_rules
        everything = ["127.0.0.1", "192.0.2.2", "fd00::2", "10.0.0.1"]
        checked = check_offer(offer(candidates=everything), rules)
        assert kept(checked.sdp) == everything and checked.dropped == 0
        assert "a=end-of-candidates" in checked.sdp  # untouched
        mdns = check_offer(offer(candidates=["abc.local"]), rules)
        assert kept(mdns.sdp) == [] and mdns.dropped == 1


def test_f13_candidates_past_the_cap_are_dropped() -> None:
    rules = CandidateRules(networks=(), max_candidates=3)
    addresses = ["127.0.0.1", *(f"198.51.99.{i}" for i in range(1, 11))]
    checked = check_offer(offer(candidates=addresses), rules)
    assert kept(checked.sdp) == ["198.51.99.1", "198.51.99.2", "198.51.99.3"]
    assert checked.dropped == 8


def test_f13_the_settings_bound_the_cap_and_parse_networks() -> None:
    with pytest.raises(ValueError):
        media_settings(ice_max_candidates=0)
    with pytest.raises(ValueError):
        media_settings(ice_candidate_networks=["10.0.0.1/8"])  # host bits set
    rules = media_settings(
        environment=Environment.DEVELOPMENT, ice_candidate_networks=[]
    ).candidate_rules
    assert rules.networks == ()  # explicitly none, even in development


# ---------------------------------------------------------------------- F1


def test_f1_an_expiring_set_forgets_by_time_oldest_first() -> None:
    memory = ExpiringSet(10.0)
    memory.put("a", 0.0)
    memory.put("b", 5.0)
    memory.put("a", 6.0)  # put again: lives on, now after b
    assert memory.contains("a", 15.0) and not memory.contains("b", 15.0)
    memory.sweep(16.0)
    assert len(memory) == 0


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The rooms' monotonic clock, at ``clock[0]`` (1000.0 to begin with)."""
    now = [1000.0]
    monkeypatch.setattr("services.media.rooms.time.monotonic", lambda: now[0])
    return now


def rooms(**overrides: Any) -> Rooms:
    async def publish(event: Event) -> None:
        raise AssertionError("nothing is published")

    def spawn(coro: Coroutine[Any, Any, Any], name: str) -> None:
        coro.close()

    return Rooms(media_settings(**overrides), publish, spawn)


async def test_f1_ended_calls_this_node_never_saw_are_kept_only_while_a_token_may_come(
    clock: list[float],
) -> None:
    node = rooms(unseen_ended_call_memory_s=150.0)
    for index in range(10_000):
        await node.close_room(f"call-{index}", CloseReason.CALL_ENDED)
    assert (len(node.ended), len(node.granted), len(node.unseen_ended)) == (0, 0, 10_000)
    # a late token for one of them opens no room for an ended call...
    with pytest.raises(SessionRefused) as refused:
        node.admit(MediaGrant("call-1", "alice", "node-a"), "call-1")
    assert refused.value.reason is Refusal.CALL_ENDED
    # ...and once no token for them can be valid, they are forgotten by time alone
    clock[0] += 151.0
    node.check(clock[0])
    assert len(node.unseen_ended) == 0
    node.admit(MediaGrant("call-1", "alice", "node-a"), "call-1")


async def test_f1_a_granted_call_that_ends_is_refused_then_forgotten(clock: list[float]) -> None:
    node = rooms(ended_call_memory_s=60.0)
    grant = MediaGrant("call-1", "alice", "node-a")
    node.admit(grant, "call-1")
    await node.close_room("call-1", CloseReason.CALL_ENDED)
    await node.close_room("call-1", CloseReason.CALL_ENDED)  # a redelivery: no change
    assert (len(node.ended), len(node.granted)) == (1, 0)
    with pytest.raises(SessionRefused) as refused:
        node.admit(grant, "call-1")
    assert refused.value.reason is Refusal.CALL_ENDED
    # The watchdog's pass forgets it after the memory window, without a lookup.
    clock[0] += 61.0
    node.check(clock[0])
    assert (len(node.ended), len(node.granted)) == (0, 0)


def test_f1_a_grant_is_forgotten_after_the_memory_window(clock: list[float]) -> None:
    node = rooms(ended_call_memory_s=60.0)
    node.admit(MediaGrant("call-1", "alice", "node-a"), "call-1")
    node.check(clock[0] + 61.0)
    assert len(node.granted) == 0
