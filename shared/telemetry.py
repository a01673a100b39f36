"""Telemetry: logs, OpenTelemetry traces, Prometheus metrics.

One trace follows a call across services and the broker: an HTTP request's server span
comes from shared/service.py's telemetry middleware (a ``traceparent`` header continues
the caller's trace), and the bus carries the W3C ``traceparent`` in AMQP headers (see
shared/bus.py), so a consumer's span is a child of the publisher's.

Traces are sampled: ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` with the
OpenTelemetry SDK's names, read and checked by the settings (shared/settings.py); unset,
``parentbased_traceidratio`` at 1% (a new trace is kept at that ratio, a continued one as
its parent says). An unsampled trace still has its trace id (in logs, and in the events it
publishes, so the next service decides alike) but its spans record nothing. Sampled
spans are exported over OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; otherwise
they go nowhere.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from shared.settings import DEFAULT_TRACE_SAMPLE_RATIO, TraceSampler

_provider: TracerProvider | None = None
# Whether the provider's sampler keeps a child exactly when its parent was kept (the
# ParentBased samplers, with their default delegates for a sampled or unsampled parent)
_children_follow_parent = False

# --------------------------------------------------------------------------- metrics
# One registry per process; the ``service`` label tells services apart where tests run
# several in one process.

HTTP_REQUESTS = Counter(
    "dmcall_http_requests_total",
    "HTTP requests handled",
    ["service", "method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "dmcall_http_request_duration_seconds",
    "HTTP request latency",
    ["service", "method", "route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
BUS_PUBLISHED = Counter("dmcall_bus_published_total", "Events published", ["service", "event_type"])
BUS_HANDLED = Counter(
    "dmcall_bus_handled_total",
    "Deliveries handled, by outcome (ok, duplicate, retried, dead_lettered)",
    ["service", "queue", "event_type", "outcome"],
)
BUS_HANDLER_LATENCY = Histogram(
    "dmcall_bus_handler_duration_seconds",
    "Event handler latency",
    ["service", "queue"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
)


def metrics_payload(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST


# --------------------------------------------------------------------------- logs


class _TraceIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        record.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else "-"
        return True


# Credentials that must never reach a log line, whoever logs it (uvicorn logs a WebSocket's
# whole request target, ``?token=<JWT>`` included; an exception can quote a URL or a body).
_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # any JWT (user, platform and media tokens): three base64url parts, the first a JSON header
    (re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), "<redacted>"),
    # bearer credentials in headers
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 <redacted>"),
    # query parameters and form/JSON fields that carry a credential
    (
        re.compile(
            r"(?i)(\b(?:token|access_token|media_token|credential|password|"
            r"secret|auth|authorization|p256dh)[\"']?\s*[=:]\s*[\"']?)[^&\s\"',}]+"
        ),
        r"\1<redacted>",
    ),
)


# Every pattern above needs one of these in the line, in any case: in an ASCII line
# without one of them nothing can match, and the three scans are skipped (a log line's
# redaction 14.7 -> ~1 µs; docs/performance.md). A line with other characters is always
# scanned: ``(?i)`` also matches a few non-ASCII letters to ASCII ones (U+017F long s to
# ``s``, U+212A Kelvin sign to ``k``, U+0131 dotless i to ``i``), which no substring test
# would see.
_SECRET_HINTS = (
    "eyj",
    "bearer",
    "basic",
    "token",
    "credential",
    "password",
    "secret",
    "auth",
    "p256dh",
)


def redact(text: str) -> str:
    """``text`` with every token, bearer credential and credential-valued field masked."""
    if text.isascii():
        lowered = text.lower()
        if not any(hint in lowered for hint in _SECRET_HINTS):
            return text
    return _redact_scan(text)


def _redact_scan(text: str) -> str:
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class _RedactingFormatter(logging.Formatter):
    """Masks credentials in the whole formatted line, traceback included."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


# uvicorn's loggers propagate to the root handler (server_config passes no log_config),
# so its lines get the same format and the same redaction as ours.
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def setup_logging(service: str, level: str = "INFO") -> None:
    root = logging.getLogger()
    if any(getattr(h, "_dmcall", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler._dmcall = True  # type: ignore[attr-defined]
    handler.addFilter(_TraceIdFilter())
    handler.setFormatter(
        _RedactingFormatter(
            f"%(asctime)s %(levelname)s {service} %(name)s trace=%(trace_id)s %(message)s"
        )
    )
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        for other in list(logger.handlers):
            logger.removeHandler(other)
        logger.propagate = True
    # aiormq and aio_pika log every reconnect attempt at warning+; that is useful, keep it.


# --------------------------------------------------------------------------- traces


def sampler(name: TraceSampler, ratio: float) -> sampling.Sampler:
    """The sampler ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` name (validated by
    the settings, so a typo stops the service at start with the field's name)."""
    return {
        TraceSampler.ALWAYS_ON: lambda: sampling.ALWAYS_ON,
        TraceSampler.ALWAYS_OFF: lambda: sampling.ALWAYS_OFF,
        TraceSampler.TRACEIDRATIO: lambda: sampling.TraceIdRatioBased(ratio),
        TraceSampler.PARENTBASED_ALWAYS_ON: lambda: sampling.ParentBased(sampling.ALWAYS_ON),
        TraceSampler.PARENTBASED_ALWAYS_OFF: lambda: sampling.ParentBased(sampling.ALWAYS_OFF),
        TraceSampler.PARENTBASED_TRACEIDRATIO: lambda: sampling.ParentBasedTraceIdRatio(ratio),
    }[name]()


def setup_tracing(
    service: str,
    otlp_endpoint: str | None,
    *,
    sampled: sampling.Sampler | None = None,
    extra_processor: SpanProcessor | None = None,
) -> TracerProvider:
    """Install the process's tracer provider once; later calls return the same one.
    ``sampled`` unset: the settings' default (``parentbased_traceidratio`` at 1%)."""
    global _provider, _children_follow_parent
    if _provider is None:
        chosen = sampled or sampler(
            TraceSampler.PARENTBASED_TRACEIDRATIO, DEFAULT_TRACE_SAMPLE_RATIO
        )
        _provider = TracerProvider(
            sampler=chosen,
            resource=Resource.create({"service.name": f"dmcall-{service}"}),
        )
        _children_follow_parent = _follows_parent(chosen)
        if otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            endpoint = otlp_endpoint.rstrip("/")
            if not endpoint.endswith("/v1/traces"):
                endpoint += "/v1/traces"
            _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        trace.set_tracer_provider(_provider)
    if extra_processor is not None:
        _provider.add_span_processor(extra_processor)
    return _provider


def _follows_parent(chosen: sampling.Sampler) -> bool:
    """True for a ParentBased sampler whose delegates for a parent that has been decided
    are the defaults: a sampled parent's child is sampled, an unsampled one's is not."""
    if not isinstance(chosen, sampling.ParentBased):
        return False
    return (
        chosen._remote_parent_sampled is sampling.ALWAYS_ON  # type: ignore[attr-defined]
        and chosen._remote_parent_not_sampled is sampling.ALWAYS_OFF  # type: ignore[attr-defined]
        and chosen._local_parent_sampled is sampling.ALWAYS_ON  # type: ignore[attr-defined]
        and chosen._local_parent_not_sampled is sampling.ALWAYS_OFF  # type: ignore[attr-defined]
    )


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def unsampled_parent(context: otel_context.Context | None = None) -> trace.Span | None:
    """The parent span (the current one, or ``context``'s) when a child of it would not
    be sampled, so making one is work for nothing; else None.

    Under a ParentBased sampler (the default) a span whose parent was not sampled is not
    sampled either: the SDK would still make it (new ids, the sampler's decision, a
    non-recording span, its context attached) for each event published and consumed. The
    parent stands in for it instead: it carries the same trace id to the logs and to the
    ``traceparent`` of what is published under it, so the next service decides alike.
    """
    if not _children_follow_parent:
        return None
    parent = trace.get_current_span(context)
    span_context = parent.get_span_context()
    if span_context.is_valid and not span_context.trace_flags.sampled:
        return parent
    return None


@contextmanager
def span(
    tracer: trace.Tracer,
    name: str,
    *,
    kind: trace.SpanKind,
    context: otel_context.Context | None = None,
    attributes: Callable[[], Mapping[str, str]] | None = None,
) -> Iterator[trace.Span]:
    """``tracer.start_as_current_span``, but none at all under an unsampled parent
    (:func:`unsampled_parent`): then the parent is current for the block (``context``'s
    is attached) and is what the block gets; its ``record_exception`` and ``set_status``
    are no-ops. ``attributes`` is called only for a span that is made."""
    parent = unsampled_parent(context)
    if parent is None:
        with tracer.start_as_current_span(
            name, context=context, kind=kind, attributes=attributes() if attributes else None
        ) as made:
            yield made
        return
    if context is None:
        yield parent
        return
    token = otel_context.attach(context)
    try:
        yield parent
    finally:
        otel_context.detach(token)


def inject_headers(headers: MutableMapping[str, Any]) -> None:
    """Write the current trace context (``traceparent``) into a carrier."""
    propagate.inject(headers)


# The headers the propagators read (traceparent, tracestate, baggage).
PROPAGATED_HEADERS = frozenset(name.encode() for name in propagate.get_global_textmap().fields)


def extract_context(headers: Mapping[str, Any] | None) -> otel_context.Context:
    carrier = {
        k: v.decode() if isinstance(v, bytes) else str(v) for k, v in (headers or {}).items()
    }
    return propagate.extract(carrier)


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None
