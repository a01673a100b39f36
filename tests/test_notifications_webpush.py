"""Web Push targets against the real broker, Redis, service processes and a real local push
service: a browser-like subscriber registers, a call rings through the broker, and the push
service checks the VAPID token while the subscriber decrypts the payload (RFC 8291/8292);
TTL, Urgency and Topic; 404/410 remove the subscription, a 500 is retried; bad
subscriptions are refused; the VAPID key is shared, configured, or Web Push is off."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from redis.asyncio import Redis

from shared.contracts import CallCancelled, CallMissed, MediaKind
from tests.conftest import auth
from tests.support import notifications
from tests.support.notifications import FAST, Publish, Spawn, new_call, parties, ringing
from tests.support.push_service import PushService, Subscriber, b64d, b64e, verify_vapid
from tests.support.waiting import eventually
from tools.stack import ServiceProcess

pytestmark = pytest.mark.e2e


SUBJECT = "mailto:oncall@dmcall.example"
TOPIC = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


@pytest.fixture
def push_service() -> Iterator[PushService]:
    server = PushService()
    server.start()
    yield server
    server.stop()


async def subscribe(
    client: httpx.AsyncClient, subscription: dict[str, Any], expect: int = 201
) -> dict[str, Any]:
    response = await client.post(
        "/v1/devices", json={"kind": "webpush", "subscription": subscription}
    )
    assert response.status_code == expect, response.text
    return dict(response.json())


def opened(browser: Subscriber, request: Any) -> dict[str, Any]:
    return dict(json.loads(browser.decrypt(request.body)))


# --------------------------------------------------------------------------- delivery


async def test_a_subscription_gets_encrypted_vapid_signed_pushes_with_ttl_urgency_and_topic(
    spawn: Spawn, publish: Publish, token: Callable[..., str], push_service: PushService
) -> None:
    proc = spawn("notifications", **FAST, VAPID_SUBJECT=SUBJECT)
    bob = token("bob")
    browser = Subscriber.new()
    endpoint = push_service.url("/push/bob-laptop")
    push_service.script("/push/bob-laptop", 201)
    async with httpx.AsyncClient(base_url=proc.url, headers=auth(bob)) as client:
        key = (await client.get("/v1/webpush/vapid-public-key")).json()
        assert key["content_encoding"] == "aes128gcm"
        assert len(b64d(key["public_key"])) == 65 and b64d(key["public_key"])[0] == 4

        device = await subscribe(client, browser.subscription(endpoint))
        assert (device["kind"], device["url"], device["secret"]) == ("webpush", endpoint, None)
        # A browser registers its subscription on every visit: the same one is one device.
        again = await subscribe(client, browser.subscription(endpoint), expect=200)
        assert again["id"] == device["id"]
        assert [d["id"] for d in (await client.get("/v1/devices")).json()] == [device["id"]]

        ring = ringing(new_call())
        await publish(ring)
        [request] = await eventually(lambda: push_service.received("/push/bob-laptop"))
        headers = request.headers
        assert headers["content-encoding"] == "aes128gcm"
        assert headers["content-type"] == "application/octet-stream"
        assert not any(name.startswith("x-dmcall") for name in headers)
        # VAPID: signed by the key browsers subscribe with, for this push service's origin.
        claims = verify_vapid(headers["authorization"], audience=push_service.origin)
        assert claims["k"] == key["public_key"] and claims["sub"] == SUBJECT
        assert claims["exp"] > request.at
        # Stale calls are dropped by the push service: TTL runs to the ring deadline.
        assert headers["urgency"] == "high"
        assert ring.ring_deadline.timestamp() - request.at <= int(headers["ttl"]) <= 600
        call_topic = headers["topic"]
        assert TOPIC.match(call_topic) and ring.call_id not in call_topic
        # The body decrypts, with the subscriber's keys, to what a webhook gets.
        payload = opened(browser, request)
        [note] = await notifications.inbox_has(proc, bob, 1)
        assert payload["notification"] == {k: v for k, v in note.items() if k != "read"}
        assert payload["notification"]["call_id"] == ring.call_id
        assert payload["priority"] == "high" and payload["device_id"] == device["id"]
        assert payload["ring_deadline"] == note["ring_deadline"]

        # Its ring_stopped replaces it where still held (same Topic), normal urgency.
        await publish(CallCancelled(call_id=ring.call_id, **parties()))
        await eventually(lambda: len(push_service.received("/push/bob-laptop")) == 2)
        stop = push_service.received("/push/bob-laptop")[1]
        assert opened(browser, stop)["notification"]["kind"] == "ring_stopped"
        assert stop.headers["topic"] == call_topic
        assert (stop.headers["urgency"], stop.headers["ttl"]) == ("normal", "300")

        # A missed call: no Topic (nothing may replace it), the long TTL.
        missed = ringing(new_call())
        await publish(missed)
        await eventually(lambda: len(push_service.received("/push/bob-laptop")) == 3)
        assert push_service.received("/push/bob-laptop")[2].headers["topic"] != call_topic
        await publish(CallMissed(call_id=missed.call_id, media=MediaKind.VIDEO, **parties()))
        await eventually(lambda: len(push_service.received("/push/bob-laptop")) == 5)
        by_kind = {
            opened(browser, r)["notification"]["kind"]: r
            for r in push_service.received("/push/bob-laptop")[3:]
        }
        assert set(by_kind) == {"ring_stopped", "missed_call"}
        missed_push = by_kind["missed_call"]
        assert "topic" not in missed_push.headers
        assert (missed_push.headers["urgency"], missed_push.headers["ttl"]) == ("normal", "86400")

        log = await eventually(
            lambda: _all_in(notifications.deliveries(client, bob, device["id"]), 5),
        )
        assert {(e["outcome"], e["status"]) for e in log} == {("delivered", 201)}
    assert push_service.refused == []


async def _all_in(log: Awaitable[list[Any]], count: int) -> list[Any] | None:
    entries = await log
    return entries if len(entries) == count else None


async def test_404_and_410_remove_a_subscription_and_a_500_is_retried(
    spawn: Spawn, publish: Publish, token: Callable[..., str], push_service: PushService
) -> None:
    proc = spawn("notifications", **FAST)
    bob = token("bob")
    push_service.script("/gone", 410)
    push_service.script("/expired", 404)
    push_service.script("/flaky", 500, 201)
    browsers = {path: Subscriber.new() for path in ("/gone", "/expired", "/flaky")}
    async with httpx.AsyncClient(base_url=proc.url, headers=auth(bob)) as client:
        devices = {}
        for path, browser in browsers.items():
            subscription = browser.subscription(
                push_service.url(path), expiration_ms=(time.time() + 86_400) * 1000
            )
            if path == "/flaky":  # padded base64url is accepted too
                keys = subscription["keys"]
                keys["auth"] += "=" * (-len(keys["auth"]) % 4)
            devices[path] = await subscribe(client, subscription)

        ring = ringing(new_call())
        await publish(ring)

        # 500, then 201: retried, each attempt encrypted afresh, the same notification.
        await eventually(lambda: len(push_service.received("/flaky")) == 2)
        first, second = push_service.received("/flaky")
        assert first.body != second.body
        flaky = browsers["/flaky"]
        assert opened(flaky, first) == opened(flaky, second)
        assert opened(flaky, first)["notification"]["call_id"] == ring.call_id
        log = await eventually(
            lambda: notifications.when_outcome(
                notifications.deliveries(client, bob, devices["/flaky"]["id"]), "delivered"
            )
        )
        assert [(e["outcome"], e["status"], e["attempt"]) for e in log] == [
            ("delivered", 201, 2),
            ("retrying", 500, 1),
        ]

        # 410 (unsubscribed) and 404 (expired): the subscription is removed.
        for path in ("/gone", "/expired"):
            removed = await eventually(
                lambda path=path: notifications.when_removed(
                    client.get(f"/v1/devices/{devices[path]['id']}")
                )
            )
            assert removed["removed_reason"] == "gone"
            log = await notifications.deliveries(client, bob, devices[path]["id"])
            assert [e["outcome"] for e in log] == ["gone"]
        listed = (await client.get("/v1/devices")).json()
        assert [d["id"] for d in listed] == [devices["/flaky"]["id"]]

        # Later pushes go to the remaining subscription only.
        await publish(CallCancelled(call_id=ring.call_id, **parties()))
        await eventually(lambda: len(push_service.received("/flaky")) == 3)
        assert len(push_service.received("/gone")) == len(push_service.received("/expired")) == 1

        # The browser subscribing again after a 410 is a new device.
        gone = browsers["/gone"]
        renewed = await subscribe(client, gone.subscription(push_service.url("/gone")))
        assert renewed["id"] != devices["/gone"]["id"]
    assert push_service.refused == []


# --------------------------------------------------------------------------- registration


def _keys(p256dh: str | None = None, auth_secret: str | None = None) -> dict[str, Any]:
    good = Subscriber.new().subscription("https://push.example.com/x")["keys"]
    return {"p256dh": p256dh or good["p256dh"], "auth": auth_secret or good["auth"]}


def _not_on_curve() -> str:
    return b64e(b"\x04" + b"\xff" * 64)


async def test_bad_subscriptions_are_refused_with_422(
    spawn: Spawn, token: Callable[..., str]
) -> None:
    strict = spawn("notifications")  # the production guard: https, public addresses
    good = Subscriber.new()
    public_point = ec.generate_private_key(ec.SECP256R1()).public_key()
    compressed = b64e(
        public_point.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )
    )
    invalid = [
        {"kind": "webpush"},
        {"kind": "webpush", "url": "https://push.example.com/x"},
        {"kind": "webpush", "subscription": "https://push.example.com/x"},
        {"kind": "webpush", "subscription": {"endpoint": "https://push.example.com/x"}},
        {"kind": "webpush", "subscription": {"keys": _keys()}},
        {"kind": "webpush", "subscription": {"endpoint": 7, "keys": _keys()}},
        *(
            {"kind": "webpush", "subscription": {"endpoint": "https://p.example/x", "keys": k}}
            for k in (
                {"p256dh": _keys()["p256dh"]},
                {"auth": _keys()["auth"]},
                _keys(p256dh=compressed),
                _keys(p256dh=_not_on_curve()),
                _keys(p256dh=b64e(b"\x04" + b"\x01" * 63)),
                _keys(p256dh=_keys()["p256dh"].replace("-", "+").replace("_", "/") + "+/"),
                _keys(auth_secret=b64e(b"\x00" * 15)),
                _keys(auth_secret=b64e(b"\x00" * 17)),
                _keys(auth_secret="not base64!"),
                {"p256dh": _keys()["p256dh"], "auth": 16},
            )
        ),
        {
            "kind": "webpush",
            "subscription": good.subscription("https://push.example.com/x", expiration_ms=1000.0),
        },
        {
            "kind": "webpush",
            "subscription": good.subscription("https://push.example.com/" + "x" * 3000),
        },
    ]
    async with httpx.AsyncClient(base_url=strict.url, headers=auth(token("bob"))) as client:
        for body in invalid:
            response = await client.post("/v1/devices", json=body)
            assert response.status_code == 422, (body, response.text)
            assert response.json()["error"] == "validation_error", body
        for endpoint, reason in (
            ("http://127.0.0.1:9/push", "insecure_endpoint"),
            ("http://push.example.com/push", "insecure_endpoint"),
            ("https://127.0.0.1:9/push", "private_address"),
            ("https://10.1.2.3/push", "private_address"),
            ("https://[::1]/push", "private_address"),
            ("ftp://push.example.com/push", "invalid_url"),
            ("https://user:pw@push.example.com/push", "invalid_url"),
        ):
            response = await client.post(
                "/v1/devices", json={"kind": "webpush", "subscription": good.subscription(endpoint)}
            )
            assert response.status_code == 422, (endpoint, response.text)
            assert response.json()["reason"] == reason, (endpoint, response.text)
        assert (await client.get("/v1/devices")).json() == []
        # The webhook registration is unchanged: a webhook still needs its url.
        response = await client.post("/v1/devices", json={"kind": "webhook", "subscription": {}})
        assert response.status_code == 422


# --------------------------------------------------------------------------- the VAPID key


async def test_the_vapid_key_is_shared_in_development_configured_or_off(
    spawn: Spawn, token: Callable[..., str], redis_client: Redis, namespace: str
) -> None:
    configured = ec.generate_private_key(ec.SECP256R1())
    pem = configured.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    expected = b64e(
        configured.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    )
    starting = [
        spawn("notifications", wait=False, **FAST),
        spawn("notifications", wait=False, **FAST),
        spawn("notifications", wait=False, VAPID_PRIVATE_KEY=pem.replace("\n", "\\n")),
        spawn("notifications", wait=False, NOTIFICATIONS_WEBPUSH_ENABLED="false"),
    ]
    await asyncio.gather(*(asyncio.to_thread(p.wait_ready) for p in starting))
    first, second, own_key, off = starting
    headers = auth(token("bob"))

    async def public_key(proc: ServiceProcess) -> httpx.Response:
        async with httpx.AsyncClient(base_url=proc.url, headers=headers) as client:
            return await client.get("/v1/webpush/vapid-public-key")

    # No key set (development): generated once, kept in Redis, the same on every instance.
    keys = [(await public_key(p)).json()["public_key"] for p in (first, second, first)]
    assert len(set(keys)) == 1
    stored = await redis_client.get(f"dmcall:{namespace}:notifications:vapid:key")
    assert stored is not None
    shared = serialization.load_pem_private_key(stored, password=None)
    assert isinstance(shared, ec.EllipticCurvePrivateKey)
    assert (
        b64e(
            shared.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
        )
        == keys[0]
    )

    # VAPID_PRIVATE_KEY set (a PEM with escaped newlines, as an env file holds it).
    assert (await public_key(own_key)).json()["public_key"] == expected

    # Web Push off: no key, and subscriptions are refused.
    missing = await public_key(off)
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    async with httpx.AsyncClient(base_url=off.url, headers=headers) as client:
        subscription = Subscriber.new().subscription("https://push.example.com/x")
        response = await client.post(
            "/v1/devices", json={"kind": "webpush", "subscription": subscription}
        )
        assert response.status_code == 422
        assert response.json()["reason"] == "webpush_disabled"
    # Without a token, as everywhere: 401.
    async with httpx.AsyncClient(base_url=first.url) as client:
        assert (await client.get("/v1/webpush/vapid-public-key")).status_code == 401
