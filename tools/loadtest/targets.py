"""Issue 16's targets, each beside what this run measured and the floor of the same run.

A target is a figure of the report with a bound: ``figure(report)`` reads the figure
(None when the run did not measure it: another scenario, another mix, services not
started by the harness), ``floor(report)`` what the machine's own hops allow for it.
The table says, per target, whether this run met it; a target the run did not measure
is shown as such, never as met.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Local engines whose CPU the harness reads from /proc when they run on this machine
# (``comm`` as the kernel reports it; RabbitMQ is the Erlang VM).
ENGINES = {"rabbitmq": ("beam.smp",), "redis": ("redis-server",)}
SERVICES = ("signaling", "policy", "notifications", "media")


def engine_pids() -> dict[str, list[int]]:
    """The pids of the local RabbitMQ and Redis servers (all of them: the harness cannot
    tell the shared servers' work for this run from other clients', so the figure is an
    upper bound on a busy machine)."""
    found: dict[str, list[int]] = {name: [] for name in ENGINES}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as fh:
                comm = fh.read().strip()
        except OSError:
            continue
        for name, comms in ENGINES.items():
            if comm in comms:
                found[name].append(int(entry))
    return found


def _figure(report: dict[str, Any], *path: str) -> float | None:
    node: Any = report
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, int | float) else None


def _cpu(report: dict[str, Any], service: str) -> float | None:
    """ms of CPU per call of one kind of process (summed over its processes)."""
    per_call = report.get("cpu_ms_per_call") or {}
    values = [v for k, v in per_call.items() if k.split(":")[0] == service]
    return round(sum(values), 2) if values else None


def _answered_only(report: dict[str, Any]) -> bool:
    """A 1:1 run whose every call was answered (the report's mix, e.g. ``answered=100``,
    names answered alone: weights are percent there, fractions on the command line)."""
    config = report.get("config") or {}
    outcomes = {part.split("=")[0].strip() for part in str(config.get("mix", "")).split(",")}
    return config.get("scenario", "calls") == "calls" and outcomes == {"answered"}


def _cpu_target(service: str) -> Callable[[dict[str, Any]], float | None]:
    def read(report: dict[str, Any]) -> float | None:
        return _cpu(report, service) if _answered_only(report) else None

    return read


def _cpu_all(report: dict[str, Any]) -> float | None:
    if not _answered_only(report):
        return None
    parts = {name: _cpu(report, name) for name in (*SERVICES, *ENGINES)}
    if any(parts[name] is None for name in parts if name != "media"):  # media is optional
        return None
    return round(sum(p for p in parts.values() if p is not None), 2)


def _at_rate(rate: float, key: str) -> Callable[[dict[str, Any]], float | None]:
    """A ring percentile at the step (or the run) whose target rate was ``rate``, when
    it was placed in full (at least 95% of the asked rate)."""

    def read(report: dict[str, Any]) -> float | None:
        steps = report.get("steps") or [
            {
                "target_rate": (report.get("run") or {}).get("rate"),
                "placed_per_s": (report.get("run") or {}).get("placed_per_s"),
                "ring_ms": (report.get("latency") or {}).get("ring_ms") or {},
            }
        ]
        for step in steps:
            target = step.get("target_rate")
            if target is not None and float(target) == rate:
                if (step.get("placed_per_s") or 0) < 0.95 * rate:
                    return None
                value = (step.get("ring_ms") or {}).get(key)
                return float(value) if value is not None else None
        return None

    return read


def _sustained(report: dict[str, Any]) -> float | None:
    """The highest step rate placed in full with ring p99 ≤ 100 ms (a ramp only)."""
    best = None
    for step in report.get("steps") or []:
        p99 = (step.get("ring_ms") or {}).get("p99")
        rate = float(step.get("target_rate") or 0)
        if p99 is not None and p99 <= 100 and (step.get("placed_per_s") or 0) >= 0.95 * rate:
            best = max(best or 0.0, rate)
    return best


def _ring_floor(report: dict[str, Any]) -> float | None:
    """A call rings after two bus hops (signaling -> policy -> signaling) and a socket
    write: two of this run's bus hops at p50 is its floor."""
    hop = _figure(report, "floor", "bus_event_hop_ms", "p50")
    return round(2 * hop, 2) if hop is not None else None


def _ring_floor_p99(report: dict[str, Any]) -> float | None:
    hop = _figure(report, "floor", "bus_event_hop_ms", "p99")
    return round(2 * hop, 2) if hop is not None else None


def _group_ring(key: str) -> Callable[[dict[str, Any]], float | None]:
    """A group ring percentile, when the run placed group calls of 16 at 20/s in full."""

    def read(report: dict[str, Any]) -> float | None:
        placed = _figure(report, "run", "placed_per_s")
        if (report.get("config") or {}).get("group_size") != 16 or (placed or 0) < 0.95 * 20:
            return None
        return _figure(report, "latency", "group_ring_ms", key)

    return read


def _lost(report: dict[str, Any]) -> float | None:
    lost = report.get("lost")
    return float(sum(lost.values())) if isinstance(lost, dict) else None


@dataclass(frozen=True)
class Target:
    name: str
    bound: float
    figure: Callable[[dict[str, Any]], float | None]
    at_least: bool = False
    floor: Callable[[dict[str, Any]], float | None] | None = None
    unit: str = "ms"

    def met(self, value: float) -> bool:
        return value >= self.bound if self.at_least else value <= self.bound


TARGETS = (
    Target("signaling CPU per answered call", 2.5, _cpu_target("signaling")),
    Target("policy CPU per answered call", 0.7, _cpu_target("policy")),
    Target("notifications CPU per answered call", 1.0, _cpu_target("notifications")),
    Target("dmcall + RabbitMQ + Redis CPU per answered call", 8.0, _cpu_all),
    Target("time to ring p50 at 200 calls/s", 5.0, _at_rate(200, "p50"), floor=_ring_floor),
    Target("time to ring p99 at 200 calls/s", 20.0, _at_rate(200, "p99"), floor=_ring_floor_p99),
    Target("calls lost", 0, _lost, unit="calls"),
    Target(
        "calls/s sustained before ring p99 passes 100 ms",
        400,
        _sustained,
        at_least=True,
        unit="calls/s",
    ),
    Target("group call of 16 at 20/s rings every invitee: p99", 30.0, _group_ring("p99")),
)


def evaluate(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target: the bound, this run's figure (or None), the floor, met."""
    rows = []
    for target in TARGETS:
        value = target.figure(report)
        floor = target.floor(report) if target.floor else None
        rows.append(
            {
                "target": target.name,
                "bound": ("≥ " if target.at_least else "≤ ") + f"{target.bound:g} {target.unit}",
                "figure": value,
                "floor": floor,
                "met": None if value is None else target.met(value),
            }
        )
    return rows
