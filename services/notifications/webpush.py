"""Web Push targets: the browser's subscription, the payload encryption (RFC 8291,
``aes128gcm``) and the VAPID identity that signs every push (RFC 8292).

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
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import http_ece
import py_vapid
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.notifications.notices import NoticeKind

if TYPE_CHECKING:
    from services.notifications.settings import NotificationsSettings
    from services.notifications.store import NotificationStore

CONTENT_ENCODING = "aes128gcm"
RECORD_SIZE = 4096
# RFC 8291 §4: a push message body is at most 4096 bytes. The aes128gcm header (salt 16,
# record size 4, key id length 1, the sender's 65-byte key) takes 86 and one record adds a
# delimiter byte and a 16-byte tag, which leaves this much for the JSON.
HEADER_BYTES = 16 + 4 + 1 + 65
MAX_PAYLOAD_BYTES = RECORD_SIZE - HEADER_BYTES - 1 - 16
P256DH_BYTES = 65
AUTH_BYTES = 16
# RFC 8292 §2: a VAPID token lives at most 24 hours; ours are signed per attempt.
VAPID_TOKEN_LIFETIME_S = 12 * 3600
TOPIC_LENGTH = 32
_B64URL = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")
_MAILTO = re.compile(r"^mailto:[^@\s]+@[^@\s.]+(\.[^@\s.]+)*$", re.IGNORECASE)


class Urgency:
    """RFC 8030 §5.3 values used here."""

    HIGH = "high"
    NORMAL = "normal"


# --------------------------------------------------------------------------- encodings


def b64url_decode(value: str) -> bytes:
    """Base64url with or without padding (browsers send it without); ValueError otherwise."""
    if not _B64URL.match(value):
        raise ValueError("is not base64url (A-Z a-z 0-9 - _)")
    try:
        return base64.urlsafe_b64decode(value.rstrip("=") + "=" * (-len(value.rstrip("=")) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("is not valid base64url") from exc


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


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


# --------------------------------------------------------------------------- VAPID keys


def load_private_key(text: str) -> ec.EllipticCurvePrivateKey:
    """A VAPID private key from PEM (PKCS#8 or SEC 1; ``\\n`` escapes allowed, for env
    files), base64url of the raw 32-byte scalar, or base64url DER. ValueError otherwise."""
    text = text.strip()
    try:
        if "-----BEGIN" in text:
            pem = text.replace("\\n", "\n").encode()
            key: Any = serialization.load_pem_private_key(pem, password=None)
        else:
            key = py_vapid.Vapid02.from_string(text).private_key
    except Exception as exc:  # py-vapid raises whatever its decoders raise
        raise ValueError(
            "VAPID_PRIVATE_KEY is neither a PEM private key nor base64url of a raw P-256 "
            "key (python -m tools.vapid makes one)"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("VAPID_PRIVATE_KEY must be a P-256 (prime256v1) EC key")
    return key


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def private_key_raw(key: ec.EllipticCurvePrivateKey) -> str:
    """base64url of the 32-byte private scalar: the one-line form of VAPID_PRIVATE_KEY."""
    return b64url_encode(key.private_numbers().private_value.to_bytes(32, "big"))


def public_key_b64(key: ec.EllipticCurvePrivateKey) -> str:
    """The applicationServerKey a browser subscribes with: base64url of the uncompressed
    public point (65 bytes)."""
    return b64url_encode(
        key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    )


def check_subject(subject: str) -> str:
    """VAPID_SUBJECT must be a ``mailto:`` address or an ``https:`` URL (RFC 8292 §2.1):
    how a push service's operator reaches you."""
    if _MAILTO.match(subject):
        return subject
    parts = urlsplit(subject)
    if parts.scheme == "https" and parts.hostname:
        return subject
    raise ValueError("VAPID_SUBJECT must be mailto:<address> or an https:// URL")


def origin(url: str) -> str:
    """The origin of a push endpoint, the ``aud`` of its VAPID token (no default port)."""
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


class VapidSigner:
    """The service's VAPID identity: one key pair and a contact, signing per push."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, subject: str) -> None:
        # Our own check_subject is the rule for the subject, not py-vapid's stricter regex.
        self._vapid = py_vapid.Vapid02(private_key=key, conf={"no-strict": True})
        self.subject = subject
        self.public_key = public_key_b64(key)

    def authorization(self, endpoint: str, *, now: float | None = None) -> str:
        """``vapid t=<ES256 JWT: aud, exp, sub>,k=<public key>`` for a push to ``endpoint``.

        Raises ``py_vapid.VapidException`` when py-vapid refuses the claims (an endpoint
        whose origin it cannot express, e.g. an IPv6 literal)."""
        issued = int(time.time() if now is None else now)
        claims = {
            "aud": origin(endpoint),
            "exp": issued + VAPID_TOKEN_LIFETIME_S,
            "sub": self.subject,
        }
        return str(self._vapid.sign(claims)["Authorization"])


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
    notification: dict[str, Any], policy: DeliveryPolicy, *, now: datetime | None = None
) -> dict[str, str]:
    """``TTL``, ``Urgency`` and ``Topic`` (RFC 8030 §5) of one notification's push.

    - ``incoming_call``: urgency high; TTL the seconds left until the ring deadline, so a
      browser that comes online later is not shown a call that stopped ringing.
    - ``ring_stopped``: normal; a short TTL.
    - ``missed_call``: normal; the default TTL.

    ``incoming_call`` and ``ring_stopped`` of one call share a Topic: a push service still
    holding the incoming call for an offline browser replaces it with its ring_stopped. A
    missed_call has no Topic: it is made together with the ring_stopped and the two may be
    sent in either order; the later must not replace it.
    """
    kind = notification.get("kind")
    call_id = str(notification.get("call_id", ""))
    headers = {"Urgency": Urgency.NORMAL, "TTL": str(policy.default_ttl_s)}
    if kind == NoticeKind.INCOMING_CALL:
        headers["Urgency"] = Urgency.HIGH
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
