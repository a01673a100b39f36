"""Trace sampling is configured through the settings: ``OTEL_TRACES_SAMPLER`` and
``OTEL_TRACES_SAMPLER_ARG`` are checked when a service starts, not when the first span is."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import Decision, Sampler
from pydantic import ValidationError

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
