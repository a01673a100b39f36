"""TURN REST credentials and the ICE servers a client is given.

coturn's ``use-auth-secret`` (draft-uberti-behave-turn-rest, as Jitsi, LiveKit and Matrix's
``/voip/turnServer`` use it): no user database, only a secret shared with coturn. A
credential is ``username = "<expiry unix time>:<user id>"`` and ``credential =
base64(HMAC-SHA1(secret, username))``; coturn recomputes the HMAC and refuses a username
whose time has passed. It checks when a relay is allocated, so a call that is relaying
keeps its allocation past the expiry; a new call gets fresh credentials.

User ids (``^[A-Za-z0-9_-]{1,64}$``) never contain ``:``, so the username splits
unambiguously.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any

from services.signaling.ice_urls import needs_credentials
from services.signaling.settings import SignalingSettings


@dataclass(frozen=True, slots=True)
class TurnCredential:
    username: str
    credential: str
    expires_at: int
    """Unix time after which coturn refuses the credential for a new allocation."""


def mint_turn_credential(
    secret: str, user_id: str, *, ttl_s: int, now: float | None = None
) -> TurnCredential:
    """coturn REST credentials for ``user_id``, valid ``ttl_s`` seconds from ``now``."""
    if ":" in user_id:
        raise ValueError(f"a user id in a TURN username cannot contain ':': {user_id!r}")
    expires_at = int(time.time() if now is None else now) + ttl_s
    username = f"{expires_at}:{user_id}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return TurnCredential(username, base64.b64encode(digest).decode("ascii"), expires_at)


@dataclass(frozen=True, slots=True)
class IceServers:
    """What a deployment hands its clients: STUN URLs as they are, TURN URLs with a
    credential minted for the user asking. No URLs: an empty list (host candidates only)."""

    urls: tuple[str, ...] = ()
    secret: str | None = None
    ttl_s: int = 3600

    @classmethod
    def from_settings(cls, settings: SignalingSettings) -> IceServers:
        secret = settings.turn_secret.get_secret_value() if settings.turn_secret else None
        return cls(tuple(settings.turn_urls), secret, settings.turn_ttl_s)

    def for_user(self, user_id: str, *, now: float | None = None) -> list[dict[str, Any]]:
        """``RTCIceServer`` dicts, as ``new RTCPeerConnection({iceServers})`` takes them."""
        stun = [url for url in self.urls if not needs_credentials(url)]
        turn = [url for url in self.urls if needs_credentials(url)]
        servers: list[dict[str, Any]] = []
        if stun:
            servers.append({"urls": stun})
        if turn:
            if not self.secret:
                raise RuntimeError("TURN URLs without TURN_SECRET (settings refuse this)")
            minted = mint_turn_credential(self.secret, user_id, ttl_s=self.ttl_s, now=now)
            servers.append(
                {"urls": turn, "username": minted.username, "credential": minted.credential}
            )
        return servers
