"""Forwarding delay inside the SFU: from a packet's arrival (before it is parsed) to the
return of the send of its forwarded copy (after SRTP and the UDP send).

Kept cheaply on the hot path: one forwarded copy in ``SAMPLE_EVERY`` is timed (the
forwarder counts every copy in ``forwarded`` and records the sampled ones), into a ring
of the last samples for percentiles (stats and the benchmark) and cumulative histogram
buckets for Prometheus.
"""

from __future__ import annotations

import bisect
from array import array

SAMPLE_EVERY = 4
"""A power of two: the forwarder tests ``forwarded & (SAMPLE_EVERY - 1)``."""

BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class DelayRecorder:
    def __init__(self, window: int = 50_000) -> None:
        self._ring = array("d", bytes(8 * window))
        self._window = window
        self._next = 0
        self._filled = 0
        self.bucket_counts = [0] * (len(BUCKETS_S) + 1)
        self.count = 0
        self.total_s = 0.0
        self.forwarded = 0
        """Every forwarded copy, sampled or not."""

    def record(self, seconds: float) -> None:
        self._ring[self._next] = seconds
        self._next = (self._next + 1) % self._window
        if self._filled < self._window:
            self._filled += 1
        self.bucket_counts[bisect.bisect_left(BUCKETS_S, seconds)] += 1
        self.count += 1
        self.total_s += seconds

    def reset_window(self) -> None:
        self._next = 0
        self._filled = 0

    def percentiles(self, *quantiles: float) -> list[float | None]:
        """Of the last ``window`` samples; None when there are none."""
        if not self._filled:
            return [None for _ in quantiles]
        samples = sorted(self._ring[: self._filled])
        last = len(samples) - 1
        return [samples[min(last, round(q * last))] for q in quantiles]
