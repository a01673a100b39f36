"""Settings of the notifications service (env prefix ``NOTIFICATIONS_``, plus the common ones).

Every field below is read from ``NOTIFICATIONS_<FIELD NAME IN CAPITALS>``; docs/notifications.md
lists them with what they mean.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import CommonSettings


class NotificationsSettings(CommonSettings):
    model_config = SettingsConfigDict(
        env_prefix="NOTIFICATIONS_", extra="ignore", populate_by_name=True
    )

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

    # ---- push targets
    max_devices_per_user: int = Field(20, ge=1, le=1000)
    webhook_allow_private: bool = Field(
        False,
        description="Allow webhook URLs that resolve to private, loopback or link-local "
        "addresses (development and tests only: it opens server-side request forgery).",
    )
    push_timeout_s: float = Field(5.0, gt=0, le=120, description="Per-attempt webhook timeout.")
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
    push_claim_idle_ms: int = Field(
        60_000,
        ge=1000,
        description="A push job taken by an instance that died is taken over after this long.",
    )
    delivery_log_max: int = Field(100, ge=1, le=10_000, description="Attempts kept per device.")
    dead_letter_max: int = Field(100_000, ge=100, description="Dead-lettered pushes kept.")
