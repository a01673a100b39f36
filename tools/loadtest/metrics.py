"""What a run measured: latency samples over time, outcomes, errors by kind, losses."""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Metric(StrEnum):
    RING = "ring_ms"
    """POST /v1/calls sent -> first call.incoming on any of the callee's devices."""
    CONNECT = "connect_ms"
    """POST .../accept sent -> the caller's call.state accepted carrying its media token."""
    MISSED_LATENESS = "missed_lateness_ms"
    """call.state missed at the caller, minus the call's ring_deadline (wall clocks)."""
    PLACE = "place_ms"
    """POST /v1/calls round trip (the 202)."""
    REJECT = "reject_ms"
    """POST /v1/calls sent -> the caller's call.state rejected (denied by policy)."""
    BUSY = "busy_ms"
    """POST /v1/calls sent -> the caller's call.state busy (the callee was in a call)."""
    END_STATE = "end_state_ms"
    """decline / cancel sent -> the other party's call.state with that end."""
    NOTIFY = "notify_ms"
    """POST /v1/calls sent -> incoming_call on the callee's notification stream (sampled)."""
    GROUP_RING = "group_ring_ms"
    """A group call's POST /v1/calls sent -> call.incoming on one device of one invitee
    (one sample per invitee device)."""


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(values: list[float]) -> dict[str, float | int]:
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}
    return {
        "count": len(ordered),
        "min": round(ordered[0], 3),
        "p50": round(percentile(ordered, 50), 3),
        "p90": round(percentile(ordered, 90), 3),
        "p99": round(percentile(ordered, 99), 3),
        "p999": round(percentile(ordered, 99.9), 3),
        "max": round(ordered[-1], 3),
        "mean": round(sum(ordered) / len(ordered), 3),
    }


def latency_line(name: str, values_ms: list[float], quantiles: tuple[float, ...]) -> str:
    """One line of a benchmark's printed figures: count, the percentiles, max and mean."""
    ordered = sorted(values_ms)
    if not ordered:
        return f"{name:<34} no samples"
    cells = "".join(f" p{q:g}={percentile(ordered, q):7.1f} ms" for q in quantiles)
    return (
        f"{name:<34} n={len(ordered):<5}{cells} max={ordered[-1]:7.1f} ms "
        f"mean={sum(ordered) / len(ordered):7.1f} ms"
    )


@dataclass
class Recorder:
    """Collects everything in memory (a run is minutes, so a list of floats is fine)."""

    started: float = field(default_factory=time.monotonic)
    samples: dict[Metric, list[tuple[float, float]]] = field(default_factory=dict)
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    lost: Counter[str] = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)
    placed: int = 0
    scenarios_started: int = 0
    skipped_no_users: int = 0
    in_flight: int = 0
    notify_checked: int = 0
    notify_incoming_skipped: int = 0
    load_seconds: float = 0.0
    steps: list[dict[str, Any]] = field(default_factory=list)
    """One entry per rate step: its rate and where it starts and ends (run seconds)."""
    _recent: deque[tuple[float, Metric, float]] = field(default_factory=deque)
    _placed_times: deque[float] = field(default_factory=deque)

    WINDOW_S = 5.0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def observe(self, metric: Metric, value_ms: float) -> None:
        now = self.elapsed()
        self.samples.setdefault(metric, []).append((now, value_ms))
        self._recent.append((now, metric, value_ms))

    def call_placed(self) -> None:
        self.placed += 1
        self._placed_times.append(self.elapsed())

    def outcome(self, name: str) -> None:
        self.outcomes[name] += 1

    def error(self, kind: str, example: str = "") -> None:
        self.errors[kind] += 1
        if example and kind not in self.error_examples:
            self.error_examples[kind] = example[:500]

    def lose(self, kind: str) -> None:
        self.lost[kind] += 1

    def values(self, metric: Metric) -> list[float]:
        return [v for _, v in self.samples.get(metric, [])]

    # ------------------------------------------------------------------ live view

    def _trim(self) -> float:
        now = self.elapsed()
        horizon = now - self.WINDOW_S
        while self._recent and self._recent[0][0] < horizon:
            self._recent.popleft()
        while self._placed_times and self._placed_times[0] < horizon:
            self._placed_times.popleft()
        return now

    def current_rate(self) -> float:
        now = self._trim()
        span = min(self.WINDOW_S, max(now, 1e-3))
        return len(self._placed_times) / span

    def recent(self, metric: Metric) -> list[float]:
        self._trim()
        return sorted(v for _, m, v in self._recent if m is metric)

    def begin_step(self, rate: float) -> None:
        self.steps.append(
            {
                "rate": rate,
                "start": self.elapsed(),
                "placed_before": self.placed,
                "errors_before": sum(self.errors.values()),
                "skipped_before": self.skipped_no_users,
            }
        )

    def end_step(self) -> None:
        step = self.steps[-1]
        step["end"] = self.elapsed()
        step["placed"] = self.placed - step.pop("placed_before")
        step["errors"] = sum(self.errors.values()) - step.pop("errors_before")
        step["skipped_no_free_users"] = self.skipped_no_users - step.pop("skipped_before")

    def step_summary(self) -> list[dict[str, Any]]:
        """Per step: achieved rate and the latencies of what was observed during it."""
        rows = []
        for step in self.steps:
            if "end" not in step:
                continue
            span = max(step["end"] - step["start"], 1e-6)
            row: dict[str, Any] = {
                "target_rate": step["rate"],
                "placed_per_s": round(step["placed"] / span, 1),
                "errors": step["errors"],
                "skipped_no_free_users": step["skipped_no_free_users"],
            }
            for metric in (Metric.RING, Metric.CONNECT, Metric.PLACE):
                values = [
                    v for t, v in self.samples.get(metric, []) if step["start"] <= t < step["end"]
                ]
                row[metric.value] = summarize(values)
            rows.append(row)
        return rows

    def summary(self) -> dict[str, Any]:
        return {metric.value: summarize(self.values(metric)) for metric in Metric}
