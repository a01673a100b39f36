"""Profiling the services under load with py-spy (sampling, from outside the process).

``--profile`` records every started service during the load phase in py-spy's raw
(collapsed-stack) format, sampling only while a thread holds the GIL (Python running,
not waiting), then summarises where each process spent them: by function, by package,
and inclusive samples of our own code (services/, shared/).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

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
