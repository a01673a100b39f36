"""What one load run does: the target rate, the mix of outcomes, the population."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


class Outcome(StrEnum):
    """How a simulated call is meant to end; the harness drives it there and checks."""

    ANSWERED = "answered"
    DECLINED = "declined"
    CANCELLED = "cancelled"
    MISSED = "missed"
    BUSY = "busy"
    DENIED = "denied"


RINGING_OUTCOMES = frozenset(
    {Outcome.ANSWERED, Outcome.DECLINED, Outcome.CANCELLED, Outcome.MISSED}
)

DEFAULT_MIX = {
    Outcome.ANSWERED: 0.55,
    Outcome.DECLINED: 0.10,
    Outcome.CANCELLED: 0.10,
    Outcome.MISSED: 0.10,
    Outcome.BUSY: 0.05,
    Outcome.DENIED: 0.10,
}


def parse_mix(text: str) -> dict[Outcome, float]:
    """``answered=55,declined=10,...`` (weights, normalised) -> fractions summing to 1."""
    weights: dict[Outcome, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"mix entries look like outcome=weight, got {part!r}")
        try:
            outcome = Outcome(name.strip())
        except ValueError as exc:
            choices = ", ".join(o.value for o in Outcome)
            raise ValueError(f"unknown outcome {name.strip()!r} (one of {choices})") from exc
        weight = float(value)
        if weight < 0 or not math.isfinite(weight):
            raise ValueError(f"weight of {outcome} must be a finite number >= 0")
        weights[outcome] = weight
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("the mix needs at least one positive weight")
    return {o: w / total for o, w in weights.items() if w > 0}


def format_mix(mix: dict[Outcome, float]) -> str:
    return ",".join(f"{o.value}={w * 100:g}" for o, w in mix.items())


@dataclass
class LoadConfig:
    signaling_url: str
    policy_url: str
    notifications_url: str | None
    rate: float = 20.0
    duration_s: float = 30.0
    steps: list[float] = field(default_factory=list)
    """A ramp: rates run one after the other, ``duration_s`` each, on one population (the
    population is sized for the highest). Empty: ``rate`` for ``duration_s``."""
    mix: dict[Outcome, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    users: int | None = None
    """Simulated users (with their devices); None sizes the population from the rate."""
    min_devices: int = 1
    max_devices: int = 3
    answer_delay_s: float = 0.05
    """How long a callee 'thinks' before accepting or declining (after its device rang)."""
    hold_s: float = 0.5
    """How long an answered call lasts before the caller hangs up."""
    ring_timeout_s: float = 60.0
    """The deployment's ring timeout: how long a missed call rings (a hint for sizing;
    the harness always waits for the call's own ``ring_deadline``)."""
    event_timeout_s: float = 10.0
    """How long to wait for an expected WebSocket message before calling it lost."""
    notify_sample: float = 0.1
    """Fraction of user groups whose notification streams (SSE) are watched; every call
    to a watched user is checked for the notifications it must produce."""
    notify_timeout_s: float = 10.0
    seed: int = 1
    output_dir: Path = Path("artifacts/loadtest")
    live: bool = True
    setup_concurrency: int = 32
    group_size: int = 3
    scenario: str = "calls"
    """calls: the 1:1 mix; group: group calls, each ringing every other member of a group of
    ``group_size`` (tools/loadtest/group_calls.py)."""
    profile: bool = False
    """Record the started services with py-spy during the load phase."""
    cprofile: bool = False
    """Run the started services under cProfile and record the load phase."""

    def mean_call_seconds(self) -> float:
        """Expected time a call keeps its users busy, for sizing the population."""
        if self.scenario == "group":  # rings everyone, then the starter cancels
            return 0.3
        per = {
            Outcome.ANSWERED: self.answer_delay_s + self.hold_s + 0.1,
            Outcome.DECLINED: self.answer_delay_s + 0.1,
            Outcome.CANCELLED: self.answer_delay_s + 0.1,
            Outcome.MISSED: self.ring_timeout_s + 0.5,
            Outcome.BUSY: self.answer_delay_s + self.hold_s + 0.3,
            Outcome.DENIED: 0.1,
        }
        return sum(self.mix.get(o, 0.0) * s for o, s in per.items())

    def groups_needed(self) -> int:
        """Each call keeps one group of users busy; keep 50% headroom plus a floor."""
        if self.users is not None:
            return max(1, self.users // self.group_size)
        # Latencies grow under load and a call holds its group longer: one extra second.
        rate = max([self.rate, *self.steps])
        return max(4, math.ceil(rate * (self.mean_call_seconds() + 1.0) * 1.5) + 4)

    def schedule(self) -> list[float]:
        return list(self.steps) or [self.rate]
