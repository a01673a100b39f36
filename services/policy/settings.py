"""Settings of the policy service (env prefix ``POLICY_``, plus the common ones)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import CommonSettings


class PolicySettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="POLICY_")

    port: int = Field(8002, ge=1, le=65535)
    require_premium: bool = Field(
        True,
        description="Placing a call is a premium feature (PRODUCT.md rule 5). Off opens "
        "calling to everyone; every other rule still applies.",
    )
    verdict_ttl_s: int = Field(
        86_400,
        ge=60,
        description="How long the verdict on a call is remembered, so a redelivered "
        "call_requested gets the same single verdict instead of a second one.",
    )
    call_retention_s: int = Field(
        0,
        ge=0,
        description="How long the two parties of a call policy authorized are kept, so "
        "either can report the other. 0 keeps them for ever; set it to signaling's "
        "SIGNALING_CALL_RETENTION_S, so a call is reportable as long as history shows it.",
    )
    reports_per_hour: int = Field(
        20,
        ge=1,
        le=100_000,
        description="New reports one user may file in any sliding hour (429 beyond); a "
        "repeat of a report already filed does not count.",
    )
    max_clock_skew_s: int = Field(
        300,
        ge=0,
        description="A platform fact whose occurred_at is further in the future than this "
        "is refused: it would otherwise freeze the relation against every later change.",
    )
