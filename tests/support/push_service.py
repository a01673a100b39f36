"""Both ends of Web Push as the tests need them, built on the RFCs rather than on the code
under test.

- :class:`Subscriber` is what a browser's ``pushManager.subscribe()`` makes: a P-256 key
  pair and a 16-byte auth secret, registered as ``PushSubscription.toJSON()``; it decrypts
  what it is sent with ``http_ece`` (RFC 8291).
- :class:`PushService` is a real HTTP server on 127.0.0.1 playing the push service: like a
  real one it refuses (401) a request whose VAPID token does not verify (RFC 8292: an
  ES256 JWT signed by the key ``k``, ``aud`` the endpoint's origin, ``exp`` within 24 h),
  and otherwise answers as scripted (see :class:`WebhookReceiver`).
"""

from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass
from typing import Any

import http_ece
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.webhook_receiver import Received, WebhookReceiver


def b64d(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


@dataclass(frozen=True)
class Subscriber:
    """A browser's push subscription keys."""

    private_key: ec.EllipticCurvePrivateKey
    auth: bytes

    @classmethod
    def new(cls) -> Subscriber:
        return cls(ec.generate_private_key(ec.SECP256R1()), os.urandom(16))

    def subscription(self, endpoint: str, expiration_ms: float | None = None) -> dict[str, Any]:
        """Exactly the shape of ``PushSubscription.toJSON()``."""
        return {
            "endpoint": endpoint,
            "expirationTime": expiration_ms,
            "keys": {"p256dh": b64e(public_bytes(self.private_key)), "auth": b64e(self.auth)},
        }

    def decrypt(self, body: bytes) -> bytes:
        plain: bytes = http_ece.decrypt(
            body, private_key=self.private_key, auth_secret=self.auth, version="aes128gcm"
        )
        return plain


def verify_vapid(header: str, *, audience: str, now: float | None = None) -> dict[str, Any]:
    """Checks an ``Authorization: vapid t=<jwt>, k=<key>`` header as a push service does;
    returns the JWT's claims plus ``k``. Raises on anything wrong."""
    scheme, _, params = header.partition(" ")
    if scheme.lower() != "vapid":
        raise ValueError(f"scheme {scheme!r} is not vapid")
    parts = dict(p.strip().split("=", 1) for p in params.split(",") if "=" in p)
    token, key = parts["t"], parts["k"]
    if jwt.get_unverified_header(token).get("alg") != "ES256":
        raise ValueError("the token is not ES256")
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b64d(key))
    claims: dict[str, Any] = jwt.decode(
        token,
        public,
        algorithms=["ES256"],
        audience=audience,
        options={"require": ["aud", "exp", "sub"]},
    )
    if claims["exp"] > (now or time.time()) + 24 * 3600:
        raise ValueError("exp is more than 24 hours ahead (RFC 8292 section 2)")
    return {**claims, "k": key}


class PushService(WebhookReceiver):
    def __init__(self) -> None:
        super().__init__()
        self.refused: list[tuple[Received, str]] = []

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _next_status(self, path: str, request: Received) -> int:
        scripted = super()._next_status(path, request)
        try:
            verify_vapid(request.headers.get("authorization", ""), audience=self.origin)
        except Exception as exc:
            with self._lock:
                self.refused.append((request, f"{type(exc).__name__}: {exc}"))
            return 401
        return scripted
