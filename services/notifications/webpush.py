"""Web Push targets: the browser's subscription, the payload encryption (RFC 8291,
``aes128gcm``), the push headers, and where the VAPID key that signs every push (RFC 8292,
vapid.py) comes from.

The cryptography is Mozilla's, as pywebpush uses it: ``http-ece`` encrypts, ``py-vapid``
signs. pywebpush itself is not used: it adds a second HTTP stack (requests and aiohttp)
around the same two calls, and the push worker (push.py) already has its HTTP client,
address guard, retries, dead letters and delivery log. A Web Push target is delivered by
that same worker; only the request differs (what :func:`encrypt`, :func:`delivery_headers`
and :meth:`VapidSigner.authorization` make).

A browser subscribes with the service's public key and registers what
``PushSubscription.toJSON()`` gives::

    {"endpoint": "https://fcm.googleapis.com/fcm/send/...", "expirationTime": null,
     "keys": {"p256dh": "<base64url, 65 bytes>", "auth": "<base64url, 16 bytes>"}}

Where the VAPID key comes from (:class:`VapidKeys`): ``VAPID_PRIVATE_KEY`` when set (required
in production when Web Push is enabled); in development without it, a key generated once
and kept in Redis, so every instance signs with the same key and subscriptions survive
restarts (not a flush of Redis).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import http_ece
from cryptography.hazmat.primitives.asymmetric import ec

from services.notifications.notices import NoticeKind, Priority
from services.notifications.settings import NotificationsSettings
from services.notifications.store import NotificationStore
from services.notifications.vapid import (
    VapidSigner,
    b64url_encode,
    generate_private_key,
    load_private_key,
    private_key_pem,
)

CONTENT_ENCODING = "aes128gcm"
RECORD_SIZE = 4096
# RFC 8291 §4: a push message body is at most 4096 bytes. The aes128gcm header (salt 16,
# record size 4, key id length 1, the sender's 65-byte key) takes 86 and one record adds a
# delimiter byte and a 16-byte tag, which leaves this much for the JSON.
HEADER_BYTES = 16 + 4 + 1 + 65
MAX_PAYLOAD_BYTES = RECORD_SIZE - HEADER_BYTES - 1 - 16
P256DH_BYTES = 65
AUTH_BYTES = 16
TOPIC_LENGTH = 32
_B64URL = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")


# --------------------------------------------------------------------------- encodings


def b64url_decode(value: str) -> bytes:
    """Base64url with or without padding (browsers send it without); ValueError otherwise."""
    if not _B64URL.match(value):
        raise ValueError("is not base64url (A-Z a-z 0-9 - _)")
    try:
        return base64.urlsafe_b64decode(value.rstrip("=") + "=" * (-len(value.rstrip("=")) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("is not valid base64url") from exc


def decode_p256dh(value: str) -> bytes:
    """The subscriber's public key: an uncompressed P-256 point (65 bytes, 0x04 first)."""
    raw = b64url_decode(value)
    if len(raw) != P256DH_BYTES or raw[0] != 0x04:
        raise ValueError(
            f"must be an uncompressed P-256 point ({P256DH_BYTES} bytes starting 0x04), "
            f"got {len(raw)} bytes"
        )
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    except ValueError as exc:
        raise ValueError("is not a point on the P-256 curve") from exc
    return raw


def decode_auth(value: str) -> bytes:
    """The subscriber's authentication secret: 16 bytes."""
    raw = b64url_decode(value)
    if len(raw) != AUTH_BYTES:
        raise ValueError(f"must be {AUTH_BYTES} bytes, got {len(raw)}")
    return raw


# --------------------------------------------------------------------------- the VAPID key


class VapidKeys:
    """Where the VAPID key comes from: the settings, or (development, none set) Redis."""

    def __init__(self, settings: NotificationsSettings, store: NotificationStore) -> None:
        self.store = store
        self.subject = settings.vapid_subject_or_default
        configured = settings.vapid_private_key
        self._configured = (
            VapidSigner(load_private_key(configured.get_secret_value()), self.subject)
            if configured is not None
            else None
        )
        self._shared: tuple[str, VapidSigner] | None = None

    async def signer(self) -> VapidSigner:
        if self._configured is not None:
            return self._configured
        # Read every time (one GET): should Redis lose the key, every instance moves to the
        # same new one instead of each keeping its own.
        pem = await self.store.shared_vapid_key(lambda: private_key_pem(generate_private_key()))
        if self._shared is None or self._shared[0] != pem:
            self._shared = (pem, VapidSigner(load_private_key(pem), self.subject))
        return self._shared[1]


# --------------------------------------------------------------------------- one push


def encrypt(payload: bytes, p256dh: bytes, auth: bytes) -> bytes:
    """The request body: ``payload`` encrypted for one subscriber (RFC 8291), one record,
    with a fresh sender key and salt each time."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(
            f"payload is {len(payload)} bytes; Web Push carries at most {MAX_PAYLOAD_BYTES}"
        )
    body: bytes = http_ece.encrypt(
        payload,
        private_key=generate_private_key(),
        dh=p256dh,
        auth_secret=auth,
        rs=RECORD_SIZE,
        version=CONTENT_ENCODING,
    )
    return body


def topic_for(call_id: str) -> str:
    """The ``Topic`` of a call's pushes: 32 base64url characters (RFC 8030 §5.4), a hash so
    the push service does not learn the call id."""
    return b64url_encode(hashlib.sha256(f"dmcall-call:{call_id}".encode()).digest())[:TOPIC_LENGTH]


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """How long a push service keeps a push for an offline browser, by kind."""

    default_ttl_s: int
    ring_stopped_ttl_s: int


def delivery_headers(
    notification: dict[str, Any],
    priority: Priority,
    policy: DeliveryPolicy,
    *,
    now: datetime | None = None,
) -> dict[str, str]:
    """``TTL``, ``Urgency`` and ``Topic`` (RFC 8030 §5) of one notification's push.

    ``Urgency`` is the notification's priority (its values are RFC 8030's ``high`` and
    ``normal``). ``TTL``, by kind:

    - ``incoming_call``: the seconds left until the ring deadline, so a browser that comes
      online later is not shown a call that stopped ringing.
    - ``ring_stopped``: a short TTL.
    - ``missed_call``: the default TTL.

    ``incoming_call`` and ``ring_stopped`` of one call share a Topic: a push service still
    holding the incoming call for an offline browser replaces it with its ring_stopped. A
    missed_call has no Topic: it is made together with the ring_stopped and the two may be
    sent in either order; the later must not replace it.
    """
    kind = notification.get("kind")
    call_id = str(notification.get("call_id", ""))
    headers = {"Urgency": priority.value, "TTL": str(policy.default_ttl_s)}
    if kind == NoticeKind.INCOMING_CALL:
        headers["TTL"] = str(_seconds_until(notification.get("ring_deadline"), now))
        headers["Topic"] = topic_for(call_id)
    elif kind == NoticeKind.RING_STOPPED:
        headers["TTL"] = str(policy.ring_stopped_ttl_s)
        headers["Topic"] = topic_for(call_id)
    return headers


def _seconds_until(deadline: object, now: datetime | None) -> int:
    if not isinstance(deadline, str):
        return 0
    try:
        moment = datetime.fromisoformat(deadline.replace("Z", "+00:00"))
    except ValueError:
        return 0
    left = (moment - (now or datetime.now(UTC))).total_seconds()
    return max(math.ceil(left), 0)
