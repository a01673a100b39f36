"""The run's outputs: a JSON report, a PNG (latency over time and histograms), and a
summary table on the terminal."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tools.loadtest.metrics import Metric, Recorder, percentile
from tools.loadtest.targets import evaluate

TIMELINE_BUCKET_S = 1.0


def timeline(recorder: Recorder, metric: Metric) -> list[dict[str, float | int]]:
    """Per second of the run: how many samples, and their p50 / p99."""
    buckets: dict[int, list[float]] = {}
    for at, value in recorder.samples.get(metric, []):
        buckets.setdefault(int(at // TIMELINE_BUCKET_S), []).append(value)
    rows = []
    for second in sorted(buckets):
        values = sorted(buckets[second])
        rows.append(
            {
                "t": second * TIMELINE_BUCKET_S,
                "count": len(values),
                "p50": round(percentile(values, 50), 3),
                "p99": round(percentile(values, 99), 3),
            }
        )
    return rows


def build_report(
    recorder: Recorder,
    *,
    config: dict[str, Any],
    floor: dict[str, Any] | None,
    environment: dict[str, Any],
    run: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    placed_per_s = recorder.placed / run["load_seconds"] if run.get("load_seconds") else 0.0
    report = {
        "version": 1,
        "config": config,
        "environment": environment,
        "run": {**run, "calls_placed": recorder.placed, "placed_per_s": round(placed_per_s, 2)},
        "floor": floor,
        "latency": recorder.summary(),
        "outcomes": dict(sorted(recorder.outcomes.items())),
        "errors": dict(sorted(recorder.errors.items())),
        "error_examples": recorder.error_examples,
        "lost": {
            "never_rang": recorder.lost.get("never_rang", 0),
            **dict(sorted(recorder.lost.items())),
        },
        "notifications_checked": recorder.notify_checked,
        "notifications_incoming_left_out_stopped_first": recorder.notify_incoming_skipped,
        "scenarios_started": recorder.scenarios_started,
        "skipped_no_free_users": recorder.skipped_no_users,
        "timeline": {m.value: timeline(recorder, m) for m in PICTURES[_scenario(config)][0]},
        **(extra or {}),
    }
    report["targets"] = evaluate(report)
    return report


def _scenario(config: dict[str, Any]) -> str:
    return "group" if config.get("scenario") == "group" else "calls"


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")


TITLES = {
    Metric.RING: "time to ring (POST /v1/calls -> call.incoming)",
    Metric.GROUP_RING: "group call: time to ring each invitee device",
    Metric.CONNECT: "time to connect (accept -> caller accepted)",
    Metric.MISSED_LATENESS: "missed lateness (call.state missed - ring_deadline)",
    Metric.PLACE: "POST /v1/calls round trip",
}


Picture = tuple[tuple[Metric, Metric], tuple[list[Metric], list[Metric]]]
"""What a run's PNG shows: two metrics over time, and two sets of histograms."""

PICTURES: dict[str, Picture] = {
    "calls": (
        (Metric.RING, Metric.CONNECT),
        (
            [Metric.RING, Metric.CONNECT],
            [Metric.MISSED_LATENESS, Metric.REJECT, Metric.BUSY, Metric.END_STATE],
        ),
    ),
    "group": ((Metric.GROUP_RING, Metric.PLACE), ([Metric.GROUP_RING], [Metric.PLACE])),
}


def write_png(
    recorder: Recorder,
    report: dict[str, Any],
    path: Path,
    *,
    over_time: tuple[Metric, Metric] | None = None,
    histograms: tuple[list[Metric], list[Metric]] | None = None,
) -> None:
    """``over_time`` and ``histograms`` default to the run's scenario's (``PICTURES``)."""
    default_over_time, default_histograms = PICTURES[_scenario(report["config"])]
    over_time = over_time or default_over_time
    histograms = histograms or default_histograms
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    (ax_time, ax_connect_time), (ax_hist, ax_hist_other) = axes
    run = report["run"]
    fig.suptitle(
        f"dmcall {report.get('scenario', 'load')}: target {report['config'].get('rate')} "
        f"calls/s, {run['calls_placed']} calls placed ({run['placed_per_s']}/s)",
        fontsize=12,
    )
    for ax, metric in zip((ax_time, ax_connect_time), over_time, strict=True):
        title = TITLES.get(metric, metric.value)
        points = [p for p in recorder.samples.get(metric, []) if p[1] > 0]
        if not points:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.scatter([p[0] for p in points], [p[1] for p in points], s=2, alpha=0.3, label="call")
            rows = timeline(recorder, metric)
            ax.plot([r["t"] + 0.5 for r in rows], [r["p50"] for r in rows], label="p50 / s")
            ax.plot([r["t"] + 0.5 for r in rows], [r["p99"] for r in rows], label="p99 / s")
            ax.set_yscale("log")
            ax.legend(loc="upper right", fontsize=8)
        if len(recorder.steps) > 1:  # a ramp: mark where each rate begins
            for step in recorder.steps:
                ax.axvline(step["start"], color="grey", linestyle="--", linewidth=0.8)
                ax.annotate(
                    f"{step['rate']:g}/s",
                    (step["start"], 1.0),
                    xycoords=("data", "axes fraction"),
                    fontsize=7,
                    va="top",
                )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds into the run")
        ax.set_ylabel("ms")
        ax.grid(True, which="both", alpha=0.3)
    _histogram(ax_hist, recorder, histograms[0], "latency histogram")
    _histogram(ax_hist_other, recorder, histograms[1], "latency histogram")
    floor = report.get("floor") or {}
    if floor:
        one_way = floor.get("rabbitmq_one_way_ms", {}).get("p50")
        rtt = floor.get("redis_rtt_ms", {}).get("p50")
        fig.text(
            0.01,
            0.01,
            f"floor in this run: RabbitMQ one-way p50 {one_way} ms, Redis RTT p50 {rtt} ms",
            fontsize=9,
        )
    fig.tight_layout(rect=(0, 0.03, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _histogram(ax: Any, recorder: Recorder, metrics: list[Metric], title: str) -> None:
    plotted = False
    for metric in metrics:
        values = [v for v in recorder.values(metric) if v > 0]
        if not values:
            continue
        low, high = max(min(values), 0.01), max(values)
        if high <= low:
            high = low * 1.1
        bins = [low * (high / low) ** (i / 60) for i in range(61)]
        ax.hist(values, bins=bins, alpha=0.55, label=f"{metric.value} (n={len(values)})")
        plotted = True
    if plotted:
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("ms (log)")
    ax.set_ylabel("calls")
    ax.grid(True, which="both", alpha=0.3)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.2f}"
    return "-" if value is None else str(value)


def print_summary(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    run = report["run"]
    table = Table(title="dmcall load test: latency (ms)")
    for col in ("metric", "count", "p50", "p90", "p99", "p99.9", "max"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for name, row in report["latency"].items():
        if not row.get("count"):
            continue
        table.add_row(
            name,
            str(row["count"]),
            *(_fmt(row.get(k)) for k in ("p50", "p90", "p99", "p999", "max")),
        )
    for name, row in (report.get("floor") or {}).items():
        table.add_row(
            f"[dim]floor: {name}[/dim]",
            str(row.get("count", "")),
            *(_fmt(row.get(k)) for k in ("p50", "p90", "p99", "p999", "max")),
        )
    console.print(table)
    counts = Table(title="outcomes, errors, losses")
    counts.add_column("kind")
    counts.add_column("count", justify="right")
    counts.add_row(
        "calls placed", f"{run['calls_placed']} ({run['placed_per_s']}/s, target {run['rate']}/s)"
    )
    for name, count in report["outcomes"].items():
        counts.add_row(f"outcome {name}", str(count))
    for name, count in report["errors"].items():
        counts.add_row(f"[red]error {name}[/red]", str(count))
    for name, count in report["lost"].items():
        style = "red" if count else "green"
        counts.add_row(f"[{style}]lost {name}[/{style}]", str(count))
    if report.get("skipped_no_free_users"):
        skipped = str(report["skipped_no_free_users"])
        counts.add_row("[yellow]skipped: no free users[/yellow]", skipped)
    counts.add_row("notifications checked", str(report.get("notifications_checked", 0)))
    console.print(counts)
    if report.get("steps"):
        steps = Table(title="ramp: one row per rate step (ms)")
        for col in (
            "target/s",
            "placed/s",
            "ring p50",
            "ring p99",
            "connect p50",
            "connect p99",
            "errors",
            "skipped",
        ):
            steps.add_column(col, justify="right")
        for row in report["steps"]:
            ring, connect = row["ring_ms"], row["connect_ms"]
            steps.add_row(
                f"{row['target_rate']:g}",
                str(row["placed_per_s"]),
                _fmt(ring.get("p50")),
                _fmt(ring.get("p99")),
                _fmt(connect.get("p50")),
                _fmt(connect.get("p99")),
                str(row["errors"]),
                str(row["skipped_no_free_users"]),
            )
        console.print(steps)
    if report.get("targets"):
        targets = Table(title="targets (issue 16) beside the floor")
        for col in ("target", "bound", "this run", "floor", ""):
            targets.add_column(col, justify="left" if col in ("target", "") else "right")
        for row in report["targets"]:
            met = {True: "[green]met[/green]", False: "[red]not met[/red]"}
            verdict = met.get(row["met"], "[dim]not measured[/dim]")
            targets.add_row(
                row["target"], row["bound"], _fmt(row["figure"]), _fmt(row["floor"]), verdict
            )
        console.print(targets)
    per_call = report.get("cpu_ms_per_call") or {}
    for label, cpu in (report.get("cpu_seconds") or {}).items():
        extra = f" ({per_call[label]} ms per call)" if label in per_call else ""
        console.print(f"cpu {label}: {cpu} s{extra}", highlight=False)
