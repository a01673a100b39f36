"""Profiling the services under load, two ways.

``--profile`` records every started service during the load phase with py-spy (sampling,
from outside the process) in its raw (collapsed-stack) format, sampling only while a
thread holds the GIL, then summarises where each process spent them: by function, by
package, and inclusive samples of our own code (services/, shared/). A sample taken
inside a C call that holds the GIL (a ``send()`` on a socket, with the loopback peer's
receive path run inside it) counts as much as one in Python, so syscalls weigh more
there than in the process's CPU time: use it for where Python spends its time.

``--cprofile`` runs the services under cProfile (tools/loadtest/cprofiled.py) for the
load phase and reports how many Python function calls each made per call placed, the
functions with the most own time (and how often they ran per call), the packages, and
the layers a call goes through (HTTP, bus, Redis, WebSocket pushes) as shares of the
process's Python time. Exact counts (a coroutine counts once each time it resumes, so
an ``async def`` that awaits twice runs "three times"); the times are slowed by the
profiler alike.
"""

from __future__ import annotations

import contextlib
import math
import os
import pstats
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from tools.loadtest.cprofiled import DUMP_SIGNAL, START_SIGNAL, profile_path
from tools.loadtest.deployment import Deployment


def _py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Profiler:
    def __init__(
        self, deployment: Deployment, out_dir: Path, stamp: str, skip: tuple[str, ...] = ("media",)
    ) -> None:
        """Records the deployment's processes but those of the services in ``skip``."""
        self._deployment = deployment
        self._skip = skip
        self._out_dir = out_dir
        self._stamp = stamp
        self._procs: list[tuple[str, Path, subprocess.Popen[bytes]]] = []

    def start(self, seconds: float) -> None:
        exe = _py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed (it is in the dev dependencies)")
        self._out_dir.mkdir(parents=True, exist_ok=True)
        for proc in self._deployment.processes:
            if proc.proc is None or proc.service in self._skip:
                continue
            out = self._out_dir / f"profile-{self._stamp}-{proc.service}-{proc.port}.txt"
            spy = subprocess.Popen(
                [
                    exe,
                    "record",
                    "--pid",
                    str(proc.proc.pid),
                    "--duration",
                    str(max(1, math.ceil(seconds))),
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--gil",
                    "--output",
                    str(out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self._procs.append((f"{proc.service}:{proc.port}", out, spy))

    def finish(self, top: int = 15) -> dict[str, dict[str, object]]:
        summary: dict[str, dict[str, object]] = {}
        for name, out, spy in self._procs:
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(5)
            if out.exists():
                summary[name] = {"file": str(out), **summarize_raw(out.read_text(), top)}
        return summary


def _split(frame: str) -> tuple[str, str]:
    """py-spy raw frames look like ``function (package/module.py:123)``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return name, path


def _package(path: str) -> str:
    head = path.split("/", 1)[0]
    return head if "/" in path else path.removesuffix(".py")


OUR_CODE = ("services/", "shared/")


def summarize_raw(text: str, top: int = 15) -> dict[str, object]:
    """Where the samples went, from py-spy's collapsed stacks (recorded with ``--gil``, so
    only samples where Python ran): own samples per function and per package (the
    innermost frame's top-level package), and inclusive samples of our own functions."""
    own: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_split(f) for f in stack.split(";") if f and not f.startswith("process ")]
        if not frames:
            continue
        total += count
        name, path = frames[-1]
        own[f"{name} ({path})"] += count
        by_package[_package(path)] += count
        for fn in {f"{n} ({p})" for n, p in frames if p.startswith(OUR_CODE)}:
            ours[fn] += count

    def share(counter: Counter[str], limit: int = top) -> list[dict[str, object]]:
        return [
            {"function": fn, "samples": n, "share": round(n / total, 4) if total else 0.0}
            for fn, n in counter.most_common(limit)
        ]

    return {
        "samples": total,
        "own": share(own),
        "by_package": share(by_package, 20),
        "our_code_inclusive": share(ours, 25),
    }


def summary_lines(profiles: dict[str, dict[str, object]], top: int = 10) -> list[str]:
    """The printed summary of :meth:`Profiler.finish`: per process, the leading packages and
    the leading functions of our own code (inclusive)."""
    lines = []
    for name, prof in profiles.items():
        lines.append(f"py-spy {name}: {prof['samples']} samples (GIL held)")
        for title, key in (
            ("by package", "by_package"),
            ("our code, inclusive", "our_code_inclusive"),
        ):
            lines.append(f"  {title}:")
            for row in prof[key][:top]:  # type: ignore[index]
                lines.append(f"    {row['share'] * 100:5.1f}%  {row['function']}")
    return lines


# --------------------------------------------------------------------------- cProfile

LAYERS: tuple[tuple[str, str, str], ...] = (
    ("HTTP requests, uvicorn to response", "uvicorn/protocols/http/", "run_asgi"),
    ("  of which the endpoints", "fastapi/routing.py", "run_endpoint_function"),
    ("  of which FastAPI's dependencies", "fastapi/dependencies/utils.py", "solve_dependencies"),
    ("bus: consuming an event", "shared/bus.py", "_on_message"),
    ("bus: publishing an event", "shared/bus.py", "publish"),
    ("Redis commands (redis-py)", "redis/asyncio/client.py", "execute_command"),
    ("Redis pipelines (redis-py)", "redis/asyncio/client.py", "execute"),
    ("WebSocket frames sent", "starlette/websockets.py", "send"),
)
"""(what, where, function): a layer is the cumulative time of its entry function."""


def _where(path: str) -> str:
    """A module's path as the summary shows it: from its package (site-packages), our
    tree (services/, shared/, tools/, tests/), or the standard library's ``<stdlib>/``."""
    if "site-packages/" in path:
        return path.rsplit("site-packages/", 1)[1]
    for ours in ("/services/", "/shared/", "/tools/", "/tests/"):
        if ours in path:
            return ours[1:] + path.rsplit(ours, 1)[1]
    if path.startswith("/") and "/lib/python" in path:
        return "<stdlib>/" + path.rsplit("/lib/python", 1)[1].split("/", 1)[-1]
    return path


def summarize_cprofile(
    path: Path, calls: int, top: int = 15, unit: str = "call placed"
) -> dict[str, object]:
    """From a cProfile dump of the load phase, with ``calls`` of ``unit`` in it (calls
    placed; for the SFU, packets forwarded)."""
    entries = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    total_s = sum(row[2] for row in entries.values()) or 1e-9
    function_calls = sum(row[1] for row in entries.values())
    per = max(1, calls)
    own = sorted(entries.items(), key=lambda kv: -kv[1][2])[:top]
    by_package: Counter[str] = Counter()
    for (file, _, _), row in entries.items():
        where = _where(file).removeprefix("<stdlib>/")
        by_package["C functions" if where == "~" else _package(where)] += row[2]
    layers = []
    for what, where, function in LAYERS:
        cum = sum(
            row[3]
            for (file, _, name), row in entries.items()
            if name == function and _where(file).startswith(where)
        )
        layers.append({"layer": what, "share": round(cum / total_s, 4)})
    return {
        "unit": unit,
        "function_calls": function_calls,
        "function_calls_per_call": round(function_calls / per, 1),
        "own": [
            {
                "function": f"{name} ({_where(file)}:{line})",
                "share": round(row[2] / total_s, 4),
                "runs_per_call": round(row[1] / per, 2),
            }
            for (file, line, name), row in own
        ],
        "by_package": [
            {"package": pkg, "share": round(t / total_s, 4)}
            for pkg, t in by_package.most_common(12)
        ],
        "layers": layers,
    }


def cprofile_dir(output_dir: Path, stamp: str) -> Path:
    """Where a run's services dump their profiles (``--cprofile``)."""
    return output_dir / f"cprofile-{stamp}"


class CallProfiler:
    """``--cprofile``: tells the services (started under cprofiled) when the load phase
    starts and ends, then reads and summarises their profiles."""

    def __init__(self, deployment: Deployment, out_dir: Path) -> None:
        self._procs: list[tuple[str, Path, int]] = []
        seen: Counter[str] = Counter()
        for proc in deployment.processes:  # in the order start_local started them
            seen[proc.service] += 1
            if proc.proc is not None:
                out = profile_path(out_dir, proc.service, seen[proc.service])
                self._procs.append((f"{proc.service}:{proc.port}", out, proc.proc.pid))

    def _signal(self, pid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # a service that died has no profile
            os.kill(pid, signum)

    def start(self) -> None:
        for _, out, pid in self._procs:
            out.unlink(missing_ok=True)
            self._signal(pid, START_SIGNAL)

    def finish(
        self, calls: int, timeout_s: float = 60.0, unit: str = "call placed"
    ) -> dict[str, dict[str, object]]:
        for _, _, pid in self._procs:
            self._signal(pid, DUMP_SIGNAL)
        deadline = time.monotonic() + timeout_s
        summary: dict[str, dict[str, object]] = {}
        for name, out, _ in self._procs:
            while not out.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            if out.exists():
                summary[name] = {"file": str(out), **summarize_cprofile(out, calls, unit=unit)}
        return summary


def cprofile_lines(profiles: dict[str, dict[str, object]], top: int = 12) -> list[str]:
    """The printed summary of :meth:`CallProfiler.finish`."""
    lines = []
    for name, prof in profiles.items():
        lines.append(
            f"cProfile {name}: {prof['function_calls_per_call']:,} Python function calls"
            f" per {prof['unit']} ({prof['function_calls']:,} in all)"
        )
        lines.append("  layers (share of its Python time, inclusive):")
        for row in prof["layers"]:  # type: ignore[attr-defined]
            if row["share"]:
                lines.append(f"    {row['share'] * 100:5.1f}%  {row['layer']}")
        lines.append("  by package (own time):")
        for row in prof["by_package"][:8]:  # type: ignore[index]
            lines.append(f"    {row['share'] * 100:5.1f}%  {row['package']}")
        lines.append(f"  own time, runs per {prof['unit']}:")
        for row in prof["own"][:top]:  # type: ignore[index]
            lines.append(
                f"    {row['share'] * 100:5.1f}%  {row['runs_per_call']:7.1f}x  {row['function']}"
            )
    return lines
