"""Trace sampling is configured through the settings: ``OTEL_TRACES_SAMPLER`` and
``OTEL_TRACES_SAMPLER_ARG`` are checked when a service starts, not when the first span is."""

from __future__ import annotations

import pytest
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler
from pydantic import ValidationError

from shared import telemetry
from shared.settings import CommonSettings, TraceSampler
from shared.telemetry import sampler

NEW_TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
LOW_TRACE = 0x1  # a trace id every ratio above zero keeps


def _keeps(chosen: Sampler, trace_id: int = NEW_TRACE, parent_sampled: bool | None = None) -> bool:
    parent = None
    if parent_sampled is not None:
        flags = trace.TraceFlags(trace.TraceFlags.SAMPLED if parent_sampled else 0)
        context = trace.SpanContext(trace_id, 0x00F067AA0BA902B7, True, flags)
        parent = trace.set_span_in_context(trace.NonRecordingSpan(context))
    result = chosen.should_sample(parent, trace_id, "GET /v1/calls")
    return result.decision is Decision.RECORD_AND_SAMPLE


def test_unset_the_settings_keep_one_percent_of_new_traces_and_follow_a_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"):
        monkeypatch.delenv(name, raising=False)
    settings = CommonSettings()
    assert settings.otel_traces_sampler is TraceSampler.PARENTBASED_TRACEIDRATIO
    assert settings.otel_traces_sampler_arg == 0.01
    chosen = sampler(settings.otel_traces_sampler, settings.otel_traces_sampler_arg)
    assert _keeps(chosen, LOW_TRACE) and not _keeps(chosen, NEW_TRACE)
    assert _keeps(chosen, NEW_TRACE, parent_sampled=True)
    assert not _keeps(chosen, LOW_TRACE, parent_sampled=False)


def test_the_environment_names_the_sampler_and_its_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "1")
    settings = CommonSettings()
    chosen = sampler(settings.otel_traces_sampler, settings.otel_traces_sampler_arg)
    assert _keeps(chosen, NEW_TRACE) and _keeps(chosen, NEW_TRACE, parent_sampled=False)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    settings = CommonSettings()
    chosen = sampler(settings.otel_traces_sampler, settings.otel_traces_sampler_arg)
    assert not _keeps(chosen, LOW_TRACE, parent_sampled=True)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_TRACES_SAMPLER_ARG", "ten percent"),
        ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
        ("OTEL_TRACES_SAMPLER_ARG", "-0.1"),
        ("OTEL_TRACES_SAMPLER", "parentbased_sometimes"),
    ],
)
def test_a_malformed_sampler_setting_stops_the_start_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as refused:
        CommonSettings()
    [error] = refused.value.errors()
    assert error["loc"] == (variable,)
    assert value not in str(refused.value)  # the input is not printed (settings may be secret)


# --------------------------------------------------------------------------- no span work
# for an unsampled trace (telemetry.span, telemetry.unsampled_parent)


def _exporting() -> tuple[trace.Tracer, InMemorySpanExporter]:
    """A tracer of a provider of its own that keeps every root and follows every parent."""
    exported = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampling.ParentBased(sampling.ALWAYS_ON))
    provider.add_span_processor(SimpleSpanProcessor(exported))
    return provider.get_tracer("test"), exported


def _remote(sampled: bool) -> otel_context.Context:
    flags = "01" if sampled else "00"
    return propagate.extract({"traceparent": f"00-{NEW_TRACE:032x}-00f067aa0ba902b7-{flags}"})


def test_which_samplers_decide_a_child_by_its_parent() -> None:
    assert telemetry._follows_parent(sampler(TraceSampler.PARENTBASED_TRACEIDRATIO, 0.01))
    assert telemetry._follows_parent(sampler(TraceSampler.PARENTBASED_ALWAYS_ON, 1.0))
    assert not telemetry._follows_parent(sampler(TraceSampler.TRACEIDRATIO, 0.01))
    assert not telemetry._follows_parent(sampler(TraceSampler.ALWAYS_ON, 1.0))
    # a ParentBased that keeps children of unsampled parents anyway
    assert not telemetry._follows_parent(
        sampling.ParentBased(sampling.ALWAYS_ON, remote_parent_not_sampled=sampling.ALWAYS_ON)
    )


def test_under_an_unsampled_parent_no_span_is_made_and_the_trace_id_carries_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(telemetry, "_children_follow_parent", True)
    tracer, exported = _exporting()
    described: list[str] = []

    def attributes() -> dict[str, str]:
        described.append("called")
        return {"k": "v"}

    with telemetry.span(
        tracer,
        "consume",
        kind=trace.SpanKind.CONSUMER,
        context=_remote(False),
        attributes=attributes,
    ) as consumed:
        assert not consumed.is_recording()
        assert telemetry.current_trace_id() == f"{NEW_TRACE:032x}"
        # a publish under it: no span either; the event carries the same unsampled trace
        with telemetry.span(tracer, "publish", kind=trace.SpanKind.PRODUCER) as published:
            assert published is consumed
            headers: dict[str, str] = {}
            telemetry.inject_headers(headers)
        consumed.record_exception(RuntimeError("no-op on a non-recording span"))
    assert headers["traceparent"] == f"00-{NEW_TRACE:032x}-00f067aa0ba902b7-00"
    assert telemetry.current_trace_id() is None  # the parent's context is detached after
    assert exported.get_finished_spans() == ()
    assert described == []


def test_under_a_sampled_parent_or_with_no_parent_the_span_is_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(telemetry, "_children_follow_parent", True)
    tracer, exported = _exporting()
    with telemetry.span(
        tracer,
        "consume",
        kind=trace.SpanKind.CONSUMER,
        context=_remote(True),
        attributes=lambda: {"messaging.consumer": "calls"},
    ) as consumed:
        assert consumed.is_recording()
        with telemetry.span(tracer, "publish", kind=trace.SpanKind.PRODUCER) as published:
            assert published.is_recording()
    with telemetry.span(tracer, "root", kind=trace.SpanKind.SERVER):
        pass
    spans = {s.name: s for s in exported.get_finished_spans()}
    assert set(spans) == {"consume", "publish", "root"}
    assert spans["consume"].context.trace_id == NEW_TRACE
    assert spans["consume"].attributes == {"messaging.consumer": "calls"}
    assert spans["publish"].parent is not None
    assert spans["publish"].parent.span_id == spans["consume"].context.span_id
    assert spans["root"].parent is None


def test_a_sampler_that_keeps_children_of_unsampled_parents_gets_them() -> None:
    exported = InMemorySpanExporter()
    keeps_all = sampling.ParentBased(
        sampling.ALWAYS_ON, remote_parent_not_sampled=sampling.ALWAYS_ON
    )
    provider = TracerProvider(sampler=keeps_all)
    provider.add_span_processor(SimpleSpanProcessor(exported))
    # what setup_tracing decides for this sampler, and what span() then does
    assert not telemetry._follows_parent(keeps_all)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(telemetry, "_children_follow_parent", False)
        assert telemetry.unsampled_parent(_remote(False)) is None
        tracer = provider.get_tracer("test")
        with telemetry.span(
            tracer, "consume", kind=trace.SpanKind.CONSUMER, context=_remote(False)
        ):
            pass
    assert [s.name for s in exported.get_finished_spans()] == ["consume"]
