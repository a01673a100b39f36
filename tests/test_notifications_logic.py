"""The notifications service's pure logic: which event makes which notification, webhook
signatures, the retry schedule, the address guard, and Web Push's keys, encryption, VAPID
tokens and headers (no I/O)."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import http_ece
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from services.notifications import vapid, webpush
from services.notifications.guard import UrlRefused, check_url_shape, is_public_address, pinned
from services.notifications.notices import NoticeKind, Priority, notices_for
from services.notifications.push import backoff_ms, sign, verify
from services.notifications.scheduling import (
    Breakers,
    BreakerState,
    FairScheduler,
    Limits,
    Queued,
)
from services.notifications.settings import NotificationsSettings
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
from tests.support.push_service import Subscriber, b64d, b64e, verify_vapid
from tools import vapid as vapid_tool

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
    video = CallEnded(reason=EndReason.BUSY, duration_s=0, media=MediaKind.VIDEO, **P)
    assert notices_for(video)[1].fields["media"] == "video"
    assert notices_for(busy)[1].fields["media"] is None  # a call_ended from before media
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


@pytest.mark.parametrize(
    ("address", "public"),
    [
        # IPv4-mapped: judged as the IPv4 address
        ("::ffff:8.8.8.8", True),
        ("::ffff:10.0.0.1", False),
        # IPv4-compatible ::a.b.c.d (deprecated, RFC 4291): never a target
        ("::127.0.0.1", False),
        ("::10.0.0.1", False),
        ("::8.8.8.8", False),
        # SIIT ::ffff:0:a.b.c.d (RFC 2765): never a target
        ("::ffff:0:7f00:1", False),
        ("::ffff:0:a00:1", False),
        ("::ffff:0:808:808", False),
        # NAT64 well-known prefix 64:ff9b::/96 (DNS64 answers these): the IPv4 decides
        ("64:ff9b::a00:1", False),
        ("64:ff9b::7f00:1", False),
        ("64:ff9b::a9fe:a9fe", False),  # 169.254.169.254, the metadata address
        ("64:ff9b::808:808", True),
        # NAT64 local-use prefix 64:ff9b:1::/48 (RFC 8215): inside a network only
        ("64:ff9b:1::a00:1", False),
        # 6to4 2002::/16: the IPv4 in bits 16-48 decides
        ("2002:7f00:1::", False),
        ("2002:a00:1::1", False),
        ("2002:c0a8:101::1", False),
        ("2002:808:808::1", True),
        # Teredo 2001::/32: server and (obfuscated) client IPv4 both decide
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),  # client 127.0.0.1
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", False),  # client 10.0.0.1
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", True),  # client 8.8.8.8
        ("2001:0:a00:1:8000:63bf:f7f7:f7f7", False),  # server 10.0.0.1
        # other IPv6 that is not global unicast
        ("::", False),
        ("100::1", False),
        ("2001:db8::1", False),
        ("ff02::1", False),
        ("4000::1", False),
    ],
)
def test_f3_address_guard_judges_ipv4_wrapped_in_ipv6(address: str, public: bool) -> None:
    """F3: IPv6 forms that carry an IPv4 address are judged by that address (or refused)."""
    assert is_public_address(address) is public, address


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


# --------------------------------------------------------------------------- Web Push


def _production(**values: Any) -> NotificationsSettings:
    # Explicit values win over the environment this test happens to run in.
    values = {"vapid_private_key": None, "vapid_subject": None, **values}
    return NotificationsSettings(
        environment="production",
        auth_jwt_secret="p" * 40,
        media_token_secret="m" * 40,
        **values,
    )


def test_vapid_keys_load_from_pem_raw_and_der_and_nothing_else() -> None:
    key = vapid.generate_private_key()
    public = vapid.public_key_b64(key)
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    sec1 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    pem = vapid.private_key_pem(key)
    for text in (pem, pem.replace("\n", "\\n"), sec1, vapid.private_key_raw(key), b64e(der)):
        assert vapid.public_key_b64(vapid.load_private_key(text)) == public, text
    assert len(b64d(public)) == 65 and b64d(public)[0] == 4
    other_curve = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    for bad in ("", "replace-me", b64e(b"\x00" * 32), other_curve.decode(), "-----BEGIN x"):
        with pytest.raises(ValueError):
            vapid.load_private_key(bad)


def test_settings_refuse_web_push_without_vapid_outside_development() -> None:
    key = vapid.private_key_raw(vapid.generate_private_key())
    subject = "mailto:ops@calls.example.com"
    with pytest.raises(ValidationError, match="VAPID_PRIVATE_KEY or VAPID_SUBJECT"):
        _production()
    with pytest.raises(ValidationError, match="VAPID_PRIVATE_KEY or VAPID_SUBJECT"):
        _production(vapid_private_key=key)
    with pytest.raises(ValidationError, match="VAPID_PRIVATE_KEY or VAPID_SUBJECT"):
        _production(vapid_subject=subject)
    with pytest.raises(ValidationError, match="neither a PEM"):
        _production(vapid_private_key="not-a-key", vapid_subject=subject)
    for bad_subject in ("ops@calls.example.com", "http://calls.example.com", "mailto:ops"):
        with pytest.raises(ValidationError, match="VAPID_SUBJECT must be"):
            _production(vapid_private_key=key, vapid_subject=bad_subject)
    ready = _production(vapid_private_key=key, vapid_subject=subject)
    assert ready.vapid_subject_or_default == subject
    assert key not in repr(ready)  # a secret: never printed
    assert _production(webpush_enabled=False).webpush_enabled is False
    development = NotificationsSettings(environment="development", vapid_private_key=None)
    assert development.vapid_private_key is None
    assert development.vapid_subject_or_default.startswith("mailto:")
    with pytest.raises(ValidationError, match="neither a PEM"):
        NotificationsSettings(environment="development", vapid_private_key="nope")


def test_vapid_authorization_is_an_es256_token_for_the_endpoint_origin() -> None:
    key = vapid.generate_private_key()
    signer = vapid.VapidSigner(key, "https://calls.example.com/contact")
    header = signer.authorization("https://push.example.net:443/send/abc?x=1", now=1_800_000_000)
    claims = verify_vapid(header, audience="https://push.example.net", now=1_800_000_000)
    assert claims["k"] == signer.public_key == vapid.public_key_b64(key)
    assert claims["sub"] == "https://calls.example.com/contact"
    assert claims["exp"] == 1_800_000_000 + 12 * 3600
    assert vapid.origin("http://127.0.0.1:8080/p") == "http://127.0.0.1:8080"
    assert vapid.origin("https://[2001:db8::1]/p") == "https://[2001:db8::1]"


def test_payloads_are_encrypted_for_one_subscriber_within_the_size_limit() -> None:
    browser, stranger = Subscriber.new(), Subscriber.new()
    keys = browser.subscription("https://push.example.net/x")["keys"]
    p256dh, auth_secret = webpush.decode_p256dh(keys["p256dh"]), webpush.decode_auth(keys["auth"])
    payload = b'{"notification":{"kind":"incoming_call"}}'
    body = webpush.encrypt(payload, p256dh, auth_secret)
    assert browser.decrypt(body) == payload
    assert webpush.encrypt(payload, p256dh, auth_secret) != body  # fresh key and salt
    with pytest.raises(http_ece.ECEException):
        stranger.decrypt(body)
    largest = webpush.encrypt(b"x" * webpush.MAX_PAYLOAD_BYTES, p256dh, auth_secret)
    assert len(largest) == 4096
    with pytest.raises(ValueError, match="at most"):
        webpush.encrypt(b"x" * (webpush.MAX_PAYLOAD_BYTES + 1), p256dh, auth_secret)


def test_subscription_keys_are_checked() -> None:
    keys = Subscriber.new().subscription("https://push.example.net/x")["keys"]
    assert len(webpush.decode_p256dh(keys["p256dh"])) == 65
    assert len(webpush.decode_auth(keys["auth"] + "==")) == 16
    for bad in (keys["auth"], b64e(b"\x04" + b"\xff" * 64), "a+b/", "@@"):
        with pytest.raises(ValueError):
            webpush.decode_p256dh(bad)
    for bad in (keys["p256dh"], b64e(b"1" * 15), "not base64!"):
        with pytest.raises(ValueError):
            webpush.decode_auth(bad)


def test_push_headers_follow_the_notification_kind() -> None:
    policy = webpush.DeliveryPolicy(default_ttl_s=86_400, ring_stopped_ttl_s=300)
    now = datetime(2026, 11, 21, 8, 0, 0, tzinfo=UTC)
    deadline = (now + timedelta(seconds=42, milliseconds=300)).isoformat().replace("+00:00", "Z")
    ring = {"kind": "incoming_call", "call_id": "c1", "ring_deadline": deadline}
    assert webpush.delivery_headers(ring, Priority.HIGH, policy, now=now) == {
        "Urgency": "high",
        "TTL": "43",
        "Topic": webpush.topic_for("c1"),
    }
    late = webpush.delivery_headers(ring, Priority.HIGH, policy, now=now + timedelta(minutes=5))
    assert late["TTL"] == "0"
    stop = webpush.delivery_headers(
        {"kind": "ring_stopped", "call_id": "c1"}, Priority.NORMAL, policy, now=now
    )
    assert stop == {"Urgency": "normal", "TTL": "300", "Topic": webpush.topic_for("c1")}
    missed = webpush.delivery_headers(
        {"kind": "missed_call", "call_id": "c1"}, Priority.NORMAL, policy, now=now
    )
    assert missed == {"Urgency": "normal", "TTL": "86400"}
    topic = webpush.topic_for("0193a5c4-7f3e-7000-8000-000000000001")
    assert re.fullmatch(r"[A-Za-z0-9_-]{32}", topic)
    assert topic != webpush.topic_for("0193a5c4-7f3e-7000-8000-000000000002")


def test_make_vapid_key_prints_a_key_the_settings_accept(
    capsys: pytest.CaptureFixture[str],
) -> None:
    vapid_tool.main()
    lines = capsys.readouterr().out.splitlines()
    name, _, value = lines[0].partition("=")
    assert name == "VAPID_PRIVATE_KEY"
    public = lines[1].rsplit(" ", 1)[1]
    assert vapid.public_key_b64(vapid.load_private_key(value)) == public
    assert _production(vapid_private_key=value, vapid_subject="mailto:a@b.example")


# --------------------------------------------------------------------------- push scheduling


def _item(n: int, user: str, target: str, *, urgent: bool = False) -> Queued:
    return Queued(entry_id=f"{n}-0", user=user, target=target, urgent=urgent, job=None)


def test_f6_scheduler_takes_users_in_turn_within_per_user_and_per_target_caps() -> None:
    limits = Limits(
        total=4, per_user=2, per_target=1, user_backlog=50, target_backlog=50, backlog=100
    )
    scheduler = FairScheduler(limits)
    for n in range(30):  # a flood from alice over three targets, queued first
        assert scheduler.offer(_item(n, "alice", f"a{n % 3}"))
    scheduler.offer(_item(100, "bob", "b0"))
    scheduler.offer(_item(101, "carol", "c0"))
    assert not scheduler.offer(_item(100, "bob", "b0"))  # the same entry again: ignored
    started = []
    while (item := scheduler.next()) is not None:
        started.append(item)
    # alice gets her two, one per target; bob and carol are not kept waiting behind her.
    assert [(i.user, i.target) for i in started] == [
        ("alice", "a0"),
        ("bob", "b0"),
        ("carol", "c0"),
        ("alice", "a1"),
    ]
    assert scheduler.running == 4 and scheduler.next() is None  # the instance's total
    scheduler.done(started[1])
    following = scheduler.next()  # bob's slot: alice is at her cap, nobody else waits
    assert following is None
    scheduler.done(started[0])
    assert (nxt := scheduler.next()) is not None and (nxt.user, nxt.target) == ("alice", "a2")


def test_f6_scheduler_prefers_incoming_calls_and_bounds_each_users_backlog() -> None:
    limits = Limits(total=10, per_user=1, per_target=1, user_backlog=3, target_backlog=2, backlog=9)
    scheduler = FairScheduler(limits)
    scheduler.offer(_item(1, "bob", "b0"))
    scheduler.offer(_item(2, "bob", "b1", urgent=True))
    assert not scheduler.is_full("bob", "b0")
    scheduler.offer(_item(3, "bob", "b0"))
    assert scheduler.is_full("bob", "b2")  # bob holds 3
    assert scheduler.is_full("alice", "b0") and not scheduler.is_full("alice", "a0")  # b0 holds 2
    assert scheduler.room == 6
    first = scheduler.next()
    assert first is not None and first.entry_id == "2-0"  # the incoming_call first
    scheduler.done(first)
    assert not scheduler.is_full("bob", "b2") and scheduler.held == 2


def test_f6_breaker_opens_after_timeouts_in_a_row_then_half_opens_for_one_trial() -> None:
    breakers = Breakers(threshold=3, cooloff_s=30)
    assert breakers.allow("d", 0) is None
    assert not breakers.timed_out("d", 0) and not breakers.timed_out("d", 1)
    breakers.answered("d")  # an answer starts the count again
    assert not breakers.timed_out("d", 2) and not breakers.timed_out("d", 3)
    assert breakers.timed_out("d", 4)  # the third in a row
    assert breakers.state("d") is BreakerState.OPEN
    assert breakers.allow("d", 10) == pytest.approx(24)
    assert breakers.allow("other", 10) is None  # per target
    assert breakers.allow("d", 33.9) is not None  # not yet
    # cool-off over (a retry due at its end may come milliseconds "early"): one trial...
    assert breakers.allow("d", 33.99) is None
    assert breakers.state("d") is BreakerState.HALF_OPEN
    assert breakers.allow("d", 34) is not None  # ...at a time
    assert breakers.timed_out("d", 35)  # the trial timed out: open again
    assert breakers.allow("d", 36) == pytest.approx(29)
    assert breakers.allow("d", 65) is None
    breakers.answered("d")
    assert breakers.state("d") is BreakerState.CLOSED and breakers.allow("d", 66) is None


def test_a_group_calls_notices_name_the_group_and_a_1to1_calls_do_not() -> None:
    deadline = datetime.now(UTC) + timedelta(seconds=60)
    erin = {"call_id": "g1", "caller": "alice", "callee": "erin", "group": "friends"}
    [incoming] = notices_for(CallRinging(media=MediaKind.VIDEO, ring_deadline=deadline, **erin))
    assert (incoming.user, incoming.kind, incoming.priority) == (
        "erin",
        NoticeKind.INCOMING_CALL,
        Priority.HIGH,
    )
    assert (incoming.fields["from"], incoming.fields["group"]) == ("alice", "friends")
    stopped, missed = notices_for(CallMissed(media=MediaKind.VIDEO, **erin))
    assert (stopped.kind, stopped.user) == (NoticeKind.RING_STOPPED, "erin")
    assert "group" not in stopped.fields
    assert (missed.kind, missed.user, missed.fields["group"]) == (
        NoticeKind.MISSED_CALL,
        "erin",
        "friends",
    )
    assert missed.fields["media"] == "video" and missed.fields["from"] == "alice"
    # each invitee's answer, decline or cancel stops only that invitee's ringing
    for event in (CallAccepted(device_id="d", **erin), CallDeclined(**erin), CallCancelled(**erin)):
        assert kinds(event) == [("ring_stopped", "erin")]
    # the group call's end names no callee: nothing (the invitees' own events did it)
    ended = CallEnded(
        call_id="g1", caller="alice", group="friends", reason=EndReason.MISSED, duration_s=0
    )
    assert notices_for(ended) == []
    # 1:1 notices carry no group field at all (their objects are as before)
    one = notices_for(CallRinging(media=MediaKind.AUDIO, ring_deadline=deadline, **P))
    one += notices_for(CallMissed(media=MediaKind.AUDIO, **P))
    one += notices_for(CallEnded(reason=EndReason.BUSY, duration_s=0, **P))
    assert [n.kind.value for n in one] == [
        "incoming_call",
        "ring_stopped",
        "missed_call",
        "ring_stopped",
        "missed_call",
    ]
    assert all("group" not in n.fields for n in one)
