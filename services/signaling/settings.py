"""Settings of the signaling service (env prefix ``SIGNALING_``, plus the common ones).

``RING_TIMEOUT_S`` and ``CALLS_PER_MINUTE`` are read unprefixed (the product's names),
or with the prefix; so are ``TURN_URLS``, ``TURN_SECRET`` and ``TURN_TTL_S``, the names
the TURN deployment uses (Secret ``turn-auth`` holds ``TURN_SECRET`` for coturn too).
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.signaling.ice_urls import check_ice_url, needs_credentials
from shared.settings import CommonSettings, Environment

TURN_SECRET_MIN_LENGTH = 16


class SignalingSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="SIGNALING_")

    port: int = Field(8001, ge=1, le=65535)
    ring_timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        validation_alias=AliasChoices("RING_TIMEOUT_S", "SIGNALING_RING_TIMEOUT_S"),
        description="Seconds a call rings before it is missed.",
    )
    calls_per_minute: int = Field(
        10,
        ge=1,
        le=100_000,
        validation_alias=AliasChoices("CALLS_PER_MINUTE", "SIGNALING_CALLS_PER_MINUTE"),
        description="Calls one caller may place in any sliding minute (429 beyond).",
    )
    timer_poll_ms: int = Field(
        50,
        ge=5,
        le=5000,
        description="Longest sleep between two looks at the ring deadlines (every instance).",
    )
    presence_ttl_s: int = Field(
        15,
        ge=3,
        le=600,
        description="An instance's heartbeat key lives this long; refreshed every third of it.",
    )
    outbox_lease_ms: int = Field(
        10_000,
        ge=500,
        description="After this long an event its committer has not published is published "
        "by any instance.",
    )
    media_token_ttl_s: int = Field(120, ge=10, le=3600)
    idempotency_ttl_s: int = Field(86_400, ge=60)
    call_retention_s: int = Field(
        0,
        ge=0,
        description="How long call history is kept: an ended call's record expires this "
        "long after its last change, and a user's history lists the calls placed within "
        "it. 0 keeps both for ever (Redis grows ~1.2 KB a call). At least "
        "SIGNALING_IDEMPOTENCY_TTL_S, so a retried placement still finds its call.",
    )
    ws_max_message_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    ws_messages_per_s: int = Field(
        50,
        ge=1,
        le=100_000,
        description="Client frames a socket may send per second on average (twice that in "
        "a burst); beyond, each frame gets an error and is dropped.",
    )
    max_devices_per_user: int = Field(
        10,
        ge=1,
        le=1000,
        description="Device sockets one user may have open, across all instances; one more "
        "closes the oldest (close code 4429).",
    )
    signals_per_call_per_s: int = Field(
        10,
        ge=1,
        le=10_000,
        description="call.signal frames one user may send per second for one call, from all "
        "their sockets together (twice that in a burst); beyond, each gets an error and is "
        "dropped.",
    )
    ring_signal_devices: int = Field(
        5,
        ge=1,
        le=1000,
        description="While a call rings, the caller's call.signal goes to this many of the "
        "callee's devices, the most recently connected (after the answer: the answering one).",
    )
    media_rejoin_grace_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        validation_alias=AliasChoices("MEDIA_REJOIN_GRACE_S", "SIGNALING_MEDIA_REJOIN_GRACE_S"),
        description="Seconds a party may take to rejoin (the media service reads the same "
        "name): how long a moved call waits for media on its new node before it ends "
        "media_timeout.",
    )
    node_watch_ms: int = Field(
        1000,
        ge=50,
        le=60_000,
        description="How often every instance looks for calls on media nodes that are gone "
        "or draining, and moves them.",
    )

    # The web client (services/signaling/web/) runs in the browser and calls the other
    # services directly: these are their public base URLs, served to it in /config.json.
    policy_url: str = Field(
        "http://127.0.0.1:8002",
        description="Public base URL of the policy service, as the browser reaches it.",
    )
    notifications_url: str = Field(
        "http://127.0.0.1:8003",
        description="Public base URL of the notifications service, as the browser reaches it.",
    )
    demo_users: list[str] = Field(
        default_factory=lambda: ["alice", "bob", "carol", "dave", "erin", "frank"],
        description="Users the web client offers to sign in as, and lists as DM "
        "conversations (development only; JSON list).",
    )
    dev_token_ttl_s: int = Field(
        12 * 3600, ge=60, le=7 * 86_400, description="Lifetime of a development sign-in token."
    )

    # TURN: the ICE servers clients get, with coturn REST credentials (services/signaling/
    # turn.py). Empty: no ICE servers, host candidates only (the SFU is the only peer).
    turn_urls: list[str] = Field(
        default_factory=list,
        validation_alias=AliasChoices("TURN_URLS", "SIGNALING_TURN_URLS"),
        description='ICE server URLs for clients (JSON list of "stun:", "turn:" and "turns:" '
        'URLs, e.g. ["turn:turn.example.com:3478?transport=udp"]).',
    )
    turn_secret: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("TURN_SECRET", "SIGNALING_TURN_SECRET"),
        description="coturn's static-auth-secret; required when TURN_URLS has turn:/turns: URLs.",
    )
    turn_ttl_s: int = Field(
        3600,
        ge=60,
        le=86_400,
        validation_alias=AliasChoices("TURN_TTL_S", "SIGNALING_TURN_TTL_S"),
        description="Lifetime of minted TURN credentials (coturn checks it when a relay is "
        "allocated; a call already relaying keeps its allocation).",
    )

    @field_validator("turn_urls")
    @classmethod
    def _ice_urls(cls, urls: list[str]) -> list[str]:
        return [check_ice_url(raw) for raw in urls]

    @model_validator(mode="after")
    def _retention_covers_idempotency(self) -> SignalingSettings:
        if 0 < self.call_retention_s < self.idempotency_ttl_s:
            raise ValueError(
                "SIGNALING_CALL_RETENTION_S must be 0 (for ever) or at least "
                "SIGNALING_IDEMPOTENCY_TTL_S: a retried placement must find the call it made"
            )
        return self

    @model_validator(mode="after")
    def _turn_secret_when_relaying(self) -> SignalingSettings:
        if not any(needs_credentials(url) for url in self.turn_urls):
            return self
        secret = self.turn_secret.get_secret_value() if self.turn_secret else ""
        if not secret:
            raise ValueError(
                "TURN_SECRET (coturn's static-auth-secret) is required when TURN_URLS has "
                "turn: or turns: URLs"
            )
        if self.environment is Environment.PRODUCTION and len(secret) < TURN_SECRET_MIN_LENGTH:
            raise ValueError(f"TURN_SECRET must be at least {TURN_SECRET_MIN_LENGTH} characters")
        return self
