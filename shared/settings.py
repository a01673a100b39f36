"""Settings: one pydantic-settings class per service, sharing the common fields here.

Common settings are read from unprefixed variables (``RABBITMQ_URL``, ``REDIS_URL``,
``AUTH_JWT_SECRET`` ...) because every service of one deployment shares them. A
service's own settings use its prefix (``POLICY_``, ``SIGNALING_``, ...); see each
service's ``settings.py``. Nothing is read at import time: ``Settings()`` reads the
environment when a service starts.
"""

from __future__ import annotations

import socket
import uuid
from enum import StrEnum
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_JWT_SECRET = "dmcall-development-secret-do-not-deploy"
DEV_MEDIA_TOKEN_SECRET = "dmcall-development-media-secret-do-not-deploy"
DEFAULT_TRACE_SAMPLE_RATIO = 0.01
"""The share of new traces kept unless ``OTEL_TRACES_SAMPLER_ARG`` says otherwise."""


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class TraceSampler(StrEnum):
    """``OTEL_TRACES_SAMPLER``'s values that dmcall accepts (the SDK's own names)."""

    ALWAYS_ON = "always_on"
    ALWAYS_OFF = "always_off"
    TRACEIDRATIO = "traceidratio"
    PARENTBASED_ALWAYS_ON = "parentbased_always_on"
    PARENTBASED_ALWAYS_OFF = "parentbased_always_off"
    PARENTBASED_TRACEIDRATIO = "parentbased_traceidratio"


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class CommonSettings(BaseSettings):
    """What every service needs: where the broker and Redis are, how tokens are checked."""

    # A refused setting must not print the environment it read (secrets included) into
    # the container's log: the error names the field and the rule, not the value.
    model_config = SettingsConfigDict(
        extra="ignore", populate_by_name=True, hide_input_in_errors=True
    )

    environment: Environment = Field(
        Environment.PRODUCTION,
        validation_alias=_env("DMCALL_ENV"),
        description="production unless set: a deployment that forgets it fails closed (no "
        "development tokens, the development secrets refused). `make run`, the tests and the "
        "dev overlay set it explicitly.",
    )
    namespace: str = Field(
        "",
        pattern=r"^[a-z0-9-]{0,40}$",
        validation_alias=_env("DMCALL_NAMESPACE"),
        description="Prefix for exchanges, queues and Redis keys; empty in a real deployment. "
        "Tests use a unique one each so they share the servers without touching each other.",
    )
    instance_id: str = Field(
        default_factory=_default_instance_id, validation_alias=_env("DMCALL_INSTANCE_ID")
    )

    rabbitmq_url: str = Field(
        "amqp://guest:guest@127.0.0.1:5672/", validation_alias=_env("RABBITMQ_URL")
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=_env("REDIS_URL"),
        description="The Redis primary. With REDIS_SENTINELS set, only its user name, "
        "password and database number are used (Sentinel says where the primary is).",
    )
    redis_sentinels: str = Field(
        "",
        validation_alias=_env("REDIS_SENTINELS"),
        description="Comma-separated host:port of Redis Sentinels: when set, the services "
        "ask them where the primary is (and again after a failover) instead of REDIS_URL's "
        "host.",
    )
    redis_sentinel_master: str = Field(
        "",
        validation_alias=_env("REDIS_SENTINEL_MASTER"),
        description="The master name the Sentinels monitor (`sentinel monitor <name> ...`); "
        "required with REDIS_SENTINELS.",
    )
    redis_sentinel_username: str | None = Field(
        None, validation_alias=_env("REDIS_SENTINEL_USERNAME")
    )
    redis_sentinel_password: str | None = Field(
        None,
        validation_alias=_env("REDIS_SENTINEL_PASSWORD"),
        description="The Sentinels' own password (`requirepass` in sentinel.conf), when they "
        "have one; the primary's is REDIS_URL's.",
    )

    auth_jwt_secret: str = Field(DEV_JWT_SECRET, validation_alias=_env("AUTH_JWT_SECRET"))
    auth_jwt_public_key: str | None = Field(
        None,
        validation_alias=_env("AUTH_JWT_PUBLIC_KEY"),
        description="PEM of an RS256 public key; when set, user tokens are RS256 only.",
    )
    auth_jwt_issuer: str | None = Field(None, validation_alias=_env("AUTH_JWT_ISSUER"))
    auth_jwt_audience: str | None = Field(None, validation_alias=_env("AUTH_JWT_AUDIENCE"))
    media_token_secret: str = Field(
        DEV_MEDIA_TOKEN_SECRET, validation_alias=_env("MEDIA_TOKEN_SECRET")
    )

    bus_prefetch: int = Field(64, ge=1, le=10_000, validation_alias=_env("BUS_PREFETCH"))
    bus_max_attempts: int = Field(5, ge=1, le=100, validation_alias=_env("BUS_MAX_ATTEMPTS"))
    bus_retry_delay_ms: int = Field(
        500, ge=1, le=3_600_000, validation_alias=_env("BUS_RETRY_DELAY_MS")
    )
    bus_dedup_ttl_s: int = Field(
        86_400,
        ge=1,
        validation_alias=_env("BUS_DEDUP_TTL_S"),
        description="How long a handled event id is remembered per consumer.",
    )
    bus_claim_ttl_ms: int = Field(
        30_000,
        ge=100,
        validation_alias=_env("BUS_CLAIM_TTL_MS"),
        description="How long an event being handled stays claimed if its handler dies.",
    )

    bus_queue_type: Literal["classic", "quorum"] = Field(
        "classic",
        validation_alias=_env("BUS_QUEUE_TYPE"),
        description="Type of the services' durable queues: quorum on a RabbitMQ cluster "
        "(replicated); classic on one broker. Set it before the queues first exist.",
    )

    bus_queue_expires_ms: int | None = Field(
        None,
        ge=1000,
        validation_alias=_env("BUS_QUEUE_EXPIRES_MS"),
        description="Delete queues after this long unused (tests; unset in production).",
    )

    group_call_max_participants: int = Field(
        16, ge=2, le=64, validation_alias=_env("GROUP_CALL_MAX_PARTICIPANTS")
    )
    """The most participants a group call holds (joined at once); signaling refuses a
    join past it, policy rings at most this many minus the starter, media admits this many."""
    cors_allow_origins: list[str] = Field(
        default_factory=lambda: ["*"],
        validation_alias=_env("CORS_ALLOW_ORIGINS"),
        description="Origins allowed to call the APIs from a browser (JSON list). Tokens are "
        "bearer tokens, never cookies, so no credentials are allowed cross-origin.",
    )

    max_body_bytes: int = Field(64 * 1024, ge=1024, validation_alias=_env("MAX_BODY_BYTES"))
    max_header_bytes: int = Field(
        16 * 1024,
        ge=1024,
        le=1024 * 1024,
        validation_alias=_env("MAX_HEADER_BYTES"),
        description="Request line and headers of one request, in bytes; past it: 431.",
    )
    max_headers: int = Field(
        100, ge=8, le=10_000, validation_alias=_env("MAX_HEADERS"), description="past it: 431"
    )
    max_connections: int = Field(
        20_000,
        ge=1,
        le=1_000_000,
        validation_alias=_env("MAX_CONNECTIONS"),
        description="Open connections (HTTP and WebSocket) per process; past it a new one gets "
        "503 and is closed.",
    )
    http_keep_alive_s: int = Field(
        75,
        ge=1,
        le=3600,
        validation_alias=_env("HTTP_KEEP_ALIVE_S"),
        description="How long an idle keep-alive HTTP connection stays open. Longer than the "
        "clients' and load balancers' own idle timeouts (httpx 5 s, nginx and cloud load "
        "balancers 60 s), so that they close first: a server that closes a connection as a "
        "client reuses it fails that request.",
    )
    host: str = Field("127.0.0.1", validation_alias=_env("DMCALL_HOST"))
    tls_cert_file: str | None = Field(
        None,
        validation_alias=_env("DMCALL_TLS_CERT_FILE"),
        description="PEM certificate chain: serve HTTPS (with DMCALL_TLS_KEY_FILE). For a "
        "process clients reach directly, as media nodes are; others sit behind the ingress.",
    )
    tls_key_file: str | None = Field(None, validation_alias=_env("DMCALL_TLS_KEY_FILE"))
    log_level: str = Field("INFO", validation_alias=_env("LOG_LEVEL"))
    otel_exporter_otlp_endpoint: str | None = Field(
        None, validation_alias=_env("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    otel_traces_sampler: TraceSampler = Field(
        TraceSampler.PARENTBASED_TRACEIDRATIO,
        validation_alias=_env("OTEL_TRACES_SAMPLER"),
        description="Which traces are recorded, by the OpenTelemetry SDK's names (the "
        "parentbased_ ones follow a caller's traceparent).",
    )
    otel_traces_sampler_arg: float = Field(
        DEFAULT_TRACE_SAMPLE_RATIO,
        ge=0.0,
        le=1.0,
        validation_alias=_env("OTEL_TRACES_SAMPLER_ARG"),
        description="The share of new traces the traceidratio samplers keep (0 to 1).",
    )

    @model_validator(mode="after")
    def _check_sentinels(self) -> CommonSettings:
        if not self.redis_sentinels.strip():
            return self
        _ = self.redis_sentinel_addresses  # refuses a malformed list
        if not self.redis_sentinel_master:
            raise ValueError("REDIS_SENTINELS is set: set REDIS_SENTINEL_MASTER too")
        if urlsplit(self.redis_url).scheme != "redis":
            raise ValueError(
                "with REDIS_SENTINELS, REDIS_URL must be a redis:// URL (its user name, "
                "password and database are the primary's; TLS through Sentinel is not supported)"
            )
        return self

    @property
    def redis_sentinel_addresses(self) -> list[tuple[str, int]]:
        """REDIS_SENTINELS as (host, port) pairs; empty when Sentinel is not used."""
        addresses = []
        for entry in filter(None, (part.strip() for part in self.redis_sentinels.split(","))):
            host, sep, port = entry.rpartition(":")
            host = host.removeprefix("[").removesuffix("]")
            if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(f"REDIS_SENTINELS: {entry!r} is not host:port")
            addresses.append((host, int(port)))
        return addresses

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> CommonSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both DMCALL_TLS_CERT_FILE and DMCALL_TLS_KEY_FILE, or neither")
        if self.environment is not Environment.PRODUCTION:
            return self
        if self.auth_jwt_public_key is None and self.auth_jwt_secret == DEV_JWT_SECRET:
            raise ValueError(
                "AUTH_JWT_SECRET is the development default; set a real secret "
                "(or AUTH_JWT_PUBLIC_KEY) outside development"
            )
        if self.media_token_secret == DEV_MEDIA_TOKEN_SECRET:
            raise ValueError(
                "MEDIA_TOKEN_SECRET is the development default; set a real secret "
                "outside development"
            )
        if self.auth_jwt_public_key is None and len(self.auth_jwt_secret) < 32:
            raise ValueError("AUTH_JWT_SECRET must be at least 32 characters")
        return self

    @property
    def is_development(self) -> bool:
        return self.environment is not Environment.PRODUCTION

    def prefixed(self, name: str) -> str:
        """An exchange or queue name in this deployment's namespace."""
        return f"{self.namespace}.{name}" if self.namespace else name

    @property
    def redis_prefix(self) -> str:
        return f"dmcall:{self.namespace}" if self.namespace else "dmcall"
