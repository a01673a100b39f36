"""Garbage collection for a long-running server: collect less often, and record (and warn
of) every pause, since a long one delays everything the process does."""

from __future__ import annotations

import atexit
import gc
import logging
import time

from prometheus_client import Histogram

log = logging.getLogger(__name__)

PAUSES = Histogram(
    "dmcall_gc_pause_seconds",
    "How long the garbage collector stopped the process, by generation",
    ["generation"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
PAUSE_WARN_S = 0.1
_started = 0.0

THRESHOLDS = (50_000, 20, 100)
"""CPython's defaults are (700, 10, 10). A process holding thousands of WebSockets tracks
millions of long-lived objects, and a full (generation 2) collection walks them all: with
10,000 devices on one signaling process it stopped the process for ~1.6 s about every
50 s during a missed-call storm, and every call whose deadline fell in such a pause was
missed that late. Fewer young collections let most short-lived objects die uncollected,
and far fewer reach the old generation, so full collections become rare."""


def tune() -> None:
    """Freeze what start-up made (modules, the app: never garbage, so no collection walks
    it again), collect less often (:data:`THRESHOLDS`), record every pause."""
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)
        # The interpreter's last collections run after logging has closed its streams:
        # a pause there is nobody's, and its warning would be a "Logging error".
        atexit.register(_stop_recording)


def _stop_recording() -> None:
    if _on_gc in gc.callbacks:
        gc.callbacks.remove(_on_gc)


def _on_gc(phase: str, info: dict[str, int]) -> None:
    global _started
    if phase == "start":
        _started = time.perf_counter()
        return
    pause = time.perf_counter() - _started
    PAUSES.labels(str(info["generation"])).observe(pause)
    if pause >= PAUSE_WARN_S:
        log.warning(
            "garbage collection of generation %d stopped the process for %.0f ms "
            "(%d objects collected)",
            info["generation"],
            pause * 1000,
            info["collected"],
        )
