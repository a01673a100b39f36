"""The VAPID identity that signs every Web Push (RFC 8292): the service's P-256 key, the
contact (``VAPID_SUBJECT``) and the signer. Pure: the settings validate the key and the
subject with it, ``make vapid-key`` makes a key with it, and webpush.py signs with it.
"""

from __future__ import annotations

import base64
import re
import time
from typing import Any
from urllib.parse import urlsplit

import py_vapid
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

# RFC 8292 §2: a VAPID token lives at most 24 hours; ours are signed per attempt.
VAPID_TOKEN_LIFETIME_S = 12 * 3600
_MAILTO = re.compile(r"^mailto:[^@\s]+@[^@\s.]+(\.[^@\s.]+)*$", re.IGNORECASE)


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


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
