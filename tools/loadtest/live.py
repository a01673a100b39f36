"""The live progress display: rate, calls in flight, outcomes, errors, percentiles."""

from __future__ import annotations

import math

from rich.console import Group as RenderGroup
from rich.table import Table
from rich.text import Text

from tools.loadtest.metrics import Metric, Recorder, percentile


def _p(values: list[float], q: float) -> str:
    value = percentile(values, q)
    return "-" if math.isnan(value) else f"{value:.1f}"


def render(recorder: Recorder, *, target_rate: float, duration_s: float, phase: str) -> RenderGroup:
    elapsed = recorder.elapsed()
    head = Text(
        f"{phase}  t={elapsed:5.1f}s/{duration_s:.0f}s  rate {recorder.current_rate():6.1f}/s "
        f"(target {target_rate:g})  placed {recorder.placed}  in flight {recorder.in_flight}  "
        f"errors {sum(recorder.errors.values())}  lost {sum(recorder.lost.values())}  "
        f"skipped {recorder.skipped_no_users}"
    )
    table = Table(expand=False, title="last 5 s / whole run (ms)", title_justify="left")
    for col in ("metric", "n(5s)", "p50", "p99", "n", "p50", "p99", "max"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    shown = (
        Metric.RING,
        Metric.CONNECT,
        Metric.PLACE,
        Metric.MISSED_LATENESS,
        Metric.REJECT,
        Metric.BUSY,
    )
    for metric in shown:
        recent = recorder.recent(metric)
        whole = sorted(recorder.values(metric))
        if not whole:
            continue
        table.add_row(
            metric.value,
            str(len(recent)),
            _p(recent, 50),
            _p(recent, 99),
            str(len(whole)),
            _p(whole, 50),
            _p(whole, 99),
            f"{whole[-1]:.1f}",
        )
    errors = ", ".join(f"{k}={v}" for k, v in recorder.errors.most_common(6)) or "none"
    outcomes = ", ".join(f"{k}={v}" for k, v in sorted(recorder.outcomes.items())) or "none"
    return RenderGroup(head, table, Text(f"outcomes: {outcomes}"), Text(f"errors: {errors}"))
