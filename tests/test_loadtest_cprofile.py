"""``--cprofile``: a process run under tools/loadtest/cprofiled.py records only between
the harness's two signals, and the summary counts its Python calls per call placed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tools.loadtest.cprofiled import DUMP_SIGNAL, START_SIGNAL
from tools.loadtest.profiling import cprofile_lines, summarize_cprofile

ROOT = Path(__file__).resolve().parents[1]


def _wait_for(path: Path, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_a_service_under_cprofiled_records_between_the_signals_and_is_summarized(
    tmp_path: Path,
) -> None:
    out, ready = tmp_path / "busy.prof", tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.loadtest.cprofiled", "tests.support.busy", str(out)],
        cwd=ROOT,
        env={**os.environ, "BUSY_READY": str(ready)},
    )
    try:
        _wait_for(ready)
        os.kill(proc.pid, START_SIGNAL)
        time.sleep(0.3)
        assert not out.exists()  # nothing is written before the dump signal
        os.kill(proc.pid, DUMP_SIGNAL)
        _wait_for(out)
        assert proc.poll() is None  # the service goes on
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)

    summary = summarize_cprofile(out, calls=10)
    functions = {row["function"]: row for row in summary["own"]}  # type: ignore[attr-defined]
    tick = next(row for name, row in functions.items() if name.startswith("tick (tests/support"))
    assert tick["runs_per_call"] > 10  # thousands of ticks over 10 "calls"
    assert tick["share"] > 0.2  # of CPU time: its sleeps cost nothing
    assert not any(name.startswith("warm_up") for name in functions)  # before the start
    assert summary["function_calls_per_call"] >= tick["runs_per_call"]  # type: ignore[operator]
    lines = cprofile_lines({"busy:0": {"file": str(out), **summary}})
    assert lines[0].startswith("cProfile busy:0: ") and any(
        "tick (tests/support" in x for x in lines
    )
