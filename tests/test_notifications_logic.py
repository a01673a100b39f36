"""The notifications service's pure logic: which event makes which notification, webhook
signatures, the retry schedule and the address guard (no I/O)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from services.notifications.notices import NoticeKind, Priority, notices_for
from services.notifications.push import (
    UrlRefused,
    backoff_ms,
    check_url_shape,
    is_public_address,
    pinned,
    sign,
    verify,
)
from services.notifications.store import parse_stream_id
from shared.contracts import (
    CallAccepted,
    CallCancelled,
    CallDeclined,
    CallEnded,
    CallMissed,
    CallRejected,
    CallRinging,
    EndReason,
    MediaKind,
    RejectReason,
)

P = {"call_id": "c1", "caller": "alice", "callee": "bob"}


def kinds(event: object, **kwargs: object) -> list[tuple[str, str]]:
    return [(n.kind.value, n.user) for n in notices_for(event, **kwargs)]  # type: ignore[arg-type]


def test_each_event_maps_to_its_notifications_for_the_callee() -> None:
    deadline = datetime.now(UTC) + timedelta(seconds=60)
    ring = CallRinging(media=MediaKind.AUDIO, ring_deadline=deadline, **P)
    [incoming] = notices_for(ring)
    assert incoming.kind is NoticeKind.INCOMING_CALL and incoming.priority is Priority.HIGH
    assert incoming.fields["from"] == "alice" and incoming.fields["media"] == "audio"
    assert incoming.fields["ring_deadline"].endswith("Z")
    assert kinds(CallAccepted(device_id="d", **P)) == [("ring_stopped", "bob")]
    assert kinds(CallDeclined(**P)) == [("ring_stopped", "bob")]
    assert kinds(CallCancelled(**P)) == [("ring_stopped", "bob")]
    assert kinds(CallMissed(media=MediaKind.VIDEO, **P)) == [
        ("ring_stopped", "bob"),
        ("missed_call", "bob"),
    ]
    busy = CallEnded(reason=EndReason.BUSY, duration_s=0, **P)
    assert kinds(busy) == [("ring_stopped", "bob"), ("missed_call", "bob")]
    assert notices_for(busy, known_media="video")[1].fields["media"] == "video"
    assert notices_for(busy)[1].fields["media"] is None
    assert kinds(CallEnded(reason=EndReason.USER_HANGUP, duration_s=3, **P)) == [
        ("ring_stopped", "bob")
    ]
    assert kinds(CallRejected(reason=RejectReason.NO_PRIOR_DM, **P)) == []


def test_a_signature_verifies_only_with_its_secret_body_and_fresh_timestamp() -> None:
    body = b'{"a":1}'
    header = sign("whsec_x", body, 1_700_000_000)
    assert header.startswith("t=1700000000,v1=") and len(header.split("v1=")[1]) == 64
    assert verify("whsec_x", body, header, now=1_700_000_010)
    assert not verify("whsec_y", body, header, now=1_700_000_010)
    assert not verify("whsec_x", b'{"a":2}', header, now=1_700_000_010)
    assert not verify("whsec_x", body, header, now=1_700_009_999)  # replayed later
    assert not verify("whsec_x", body, "garbage", now=1_700_000_000)


def test_backoff_doubles_within_jitter_and_is_capped() -> None:
    rng = random.Random(7)
    for attempt, ceiling in ((1, 1000), (2, 2000), (3, 4000), (4, 8000), (12, 60_000)):
        for _ in range(50):
            delay = backoff_ms(attempt, 1000, 60_000, rng.random)
            assert ceiling / 2 <= delay <= ceiling


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),
        ("224.0.0.1", False),
    ],
)
def test_address_guard(address: str, public: bool) -> None:
    assert is_public_address(address) is public


def test_url_shapes() -> None:
    assert check_url_shape("https://hooks.example.com/x?y=1") == ("https", "hooks.example.com", 443)
    assert check_url_shape("http://example.com:8080/") == ("http", "example.com", 8080)
    for bad in ("ftp://x/", "http:///x", "http://u:p@x/", "http://x/#f", "http://x:99999/"):
        with pytest.raises(UrlRefused):
            check_url_shape(bad)


def test_requests_are_pinned_to_the_checked_address() -> None:
    url, host, sni = pinned("https://hooks.example.com:8443/a?b=1", "93.184.216.34")
    assert url == "https://93.184.216.34:8443/a?b=1"
    assert host == "hooks.example.com:8443" and sni == "hooks.example.com"
    assert pinned("http://h.example/x", "2001:db8::1")[0] == "http://[2001:db8::1]/x"


def test_stream_ids() -> None:
    assert parse_stream_id("1732172400000-3") == (1732172400000, 3)
    for bad in ("", "1", "a-1", "1-b", "-1", "1--1", "1-2-3"):
        assert parse_stream_id(bad) is None
