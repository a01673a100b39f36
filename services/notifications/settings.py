"""Settings of the notifications service (env prefix ``NOTIFICATIONS_``, plus the common ones).

Every field below is read from ``NOTIFICATIONS_<FIELD NAME IN CAPITALS>``; docs/notifications.md
lists them with what they mean.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from services.notifications.vapid import check_subject, load_private_key
from shared.settings import CommonSettings

DEV_VAPID_SUBJECT = "mailto:webpush@dmcall.invalid"


class NotificationsSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="NOTIFICATIONS_")

    port: int = Field(8003, ge=1, le=65535)

    # ---- inbox and live stream
    inbox_max: int = Field(
        500, ge=1, le=10_000, description="Notifications kept per user (the oldest are dropped)."
    )
    stream_max: int = Field(
        1000,
        ge=10,
        le=100_000,
        description="Live-stream entries kept per user: how far back Last-Event-ID can resume.",
    )
    stream_ttl_s: int = Field(
        7 * 86_400, ge=60, description="An idle user's live stream is dropped after this long."
    )
    once_ttl_s: int = Field(
        7 * 86_400,
        ge=60,
        description="How long a (user, call, kind) notification is remembered, so the same "
        "notification is never made twice for one call.",
    )
    sse_keepalive_s: float = Field(
        15.0, gt=0, le=300, description="Idle streams get a comment line this often."
    )
    sse_retry_ms: int = Field(
        3000, ge=100, le=600_000, description="The reconnect delay the stream advises clients."
    )

    sse_max_streams_per_user: int = Field(
        10,
        ge=1,
        le=1000,
        description="Open live streams per user, counted over every instance (tabs and "
        "devices); one more is refused with 429.",
    )

    # ---- push targets
    max_devices_per_user: int = Field(20, ge=1, le=1000)
    webhook_allow_private: bool = Field(
        False,
        description="Allow webhook URLs and Web Push endpoints that resolve to private, "
        "loopback or link-local addresses, and plain-http Web Push endpoints (development "
        "and tests only: it opens server-side request forgery).",
    )
    push_timeout_s: float = Field(5.0, gt=0, le=120, description="Per-attempt webhook timeout.")
    push_incoming_call_timeout_s: float = Field(
        2.0,
        gt=0,
        le=120,
        description="Per-attempt timeout of an incoming_call push: a ring is only worth "
        "something for seconds, and a slow target must not hold a slot for long.",
    )
    push_max_attempts: int = Field(
        8, ge=1, le=50, description="Attempts before a push is dead-lettered."
    )
    push_backoff_base_ms: int = Field(
        1000, ge=10, description="Delay before the 2nd attempt; doubles with each attempt."
    )
    push_backoff_max_ms: int = Field(300_000, ge=10, description="Cap of the retry delay.")
    push_concurrency: int = Field(
        32, ge=1, le=1000, description="Webhook requests in flight per instance."
    )
    push_per_user_concurrency: int = Field(
        8,
        ge=1,
        le=1000,
        description="Push requests in flight per instance to one user's targets together.",
    )
    push_per_target_concurrency: int = Field(
        2,
        ge=1,
        le=1000,
        description="Push requests in flight per instance to one target.",
    )
    push_breaker_timeouts: int = Field(
        3,
        ge=1,
        le=1000,
        description="Timeouts in a row after which a target is not tried for the cool-off.",
    )
    push_breaker_cooloff_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="How long a target whose breaker opened is not tried; then one trial.",
    )
    push_claim_idle_ms: int = Field(
        60_000,
        ge=1000,
        description="A push job taken by an instance that died is taken over after this long.",
    )
    delivery_log_max: int = Field(100, ge=1, le=10_000, description="Attempts kept per device.")
    dead_letter_max: int = Field(100_000, ge=100, description="Dead-lettered pushes kept.")

    # ---- Web Push (docs/notifications.md, "Web Push")
    webpush_enabled: bool = Field(
        True, description="Accept kind=webpush targets (needs the VAPID settings in production)."
    )
    vapid_private_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("VAPID_PRIVATE_KEY", "NOTIFICATIONS_VAPID_PRIVATE_KEY"),
        description="The VAPID key (P-256): PEM, or base64url of the raw 32-byte key. Unset "
        "in development: one is generated and kept in Redis, shared by every instance.",
    )
    vapid_subject: str | None = Field(
        None,
        validation_alias=AliasChoices("VAPID_SUBJECT", "NOTIFICATIONS_VAPID_SUBJECT"),
        description="mailto: or https: contact a push service's operator can reach.",
    )
    webpush_ttl_s: int = Field(
        86_400,
        ge=0,
        le=28 * 86_400,
        description="How long a push service keeps a missed_call for an offline browser.",
    )
    webpush_ring_stopped_ttl_s: int = Field(
        300,
        ge=0,
        le=86_400,
        description="How long a push service keeps a ring_stopped (it also replaces a still "
        "undelivered incoming_call of the same call).",
    )

    @model_validator(mode="after")
    def _check_webpush(self) -> NotificationsSettings:
        if not self.webpush_enabled:
            return self
        if self.vapid_private_key is not None:
            load_private_key(self.vapid_private_key.get_secret_value())
        if self.vapid_subject is not None:
            check_subject(self.vapid_subject)
        if not self.is_development and (self.vapid_private_key is None or not self.vapid_subject):
            raise ValueError(
                "Web Push is enabled but VAPID_PRIVATE_KEY or VAPID_SUBJECT is not set: set "
                "both (python -m tools.vapid makes a key) or NOTIFICATIONS_WEBPUSH_ENABLED=false"
            )
        return self

    @property
    def vapid_subject_or_default(self) -> str:
        return self.vapid_subject or DEV_VAPID_SUBJECT
