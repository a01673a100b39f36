"""One load run from start to report: floor, population, devices, the paced calls, the
drain, and the outputs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import random
import resource
import socket
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from tools.loadtest import group_calls
from tools.loadtest import live as live_view
from tools.loadtest import population as pop
from tools.loadtest.config import LoadConfig, Outcome, format_mix
from tools.loadtest.deployment import Deployment, machine_cpu_seconds
from tools.loadtest.devices import Router
from tools.loadtest.floor import measure_floor
from tools.loadtest.http import HttpClient
from tools.loadtest.metrics import Metric, Recorder
from tools.loadtest.profiling import (
    CallProfiler,
    Profiler,
    cprofile_dir,
    cprofile_lines,
    summary_lines,
)
from tools.loadtest.report import build_report, print_summary, write_json, write_png
from tools.loadtest.scenarios import Context, run_one
from tools.loadtest.sse import NotificationFeed
from tools.loadtest.tokens import TokenSource


def environment() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in load],
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "note": "services, RabbitMQ, Redis and the load generator share this machine",
    }


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_used(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, float]:
    """CPU seconds each started process used between two ``Deployment.stats()``."""
    return {
        name: round(after[name]["cpu_s"] - before.get(name, {"cpu_s": 0.0})["cpu_s"], 2)
        for name in after
    }


def _choose(rng: random.Random, mix: dict[Outcome, float]) -> Outcome:
    pick = rng.random()
    acc = 0.0
    for outcome, weight in mix.items():
        acc += weight
        if pick < acc:
            return outcome
    return next(iter(mix))


async def drive(ctx: Context, *, on_tick: Any = None) -> None:
    """Start scenarios on an open-loop schedule (a slow answer never delays the next call)."""
    config = ctx.config
    rec = ctx.recorder
    grouped = config.scenario == "group"
    # Outcomes come from their own generator: the sequence depends on the seed only, not
    # on how the scenarios' own random choices interleave.
    draw = random.Random(config.seed)
    tasks: set[asyncio.Task[None]] = set()
    began = time.monotonic()
    for rate in config.schedule():
        rec.begin_step(rate)
        interval = 1.0 / rate
        start = time.monotonic()
        end = start + config.duration_s
        k = 0
        while True:
            due = start + k * interval
            if due >= end:
                break
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            k += 1
            outcome = _choose(draw, config.mix)
            group = ctx.population.acquire()
            if group is None:
                rec.skipped_no_users += 1
                continue
            one = group_calls.run(ctx, group) if grouped else run_one(ctx, outcome, group)
            task = asyncio.create_task(one)
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        rec.end_step()
    rec.load_seconds = time.monotonic() - began
    # Drain: the longest scenario is a missed call (ring timeout + grace) plus its check.
    drain_s = config.ring_timeout_s + 3 * config.event_timeout_s + config.notify_timeout_s
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=drain_s)
        for task in pending:
            task.cancel()
            rec.error("scenario_still_running_at_end")
        with contextlib.suppress(Exception):
            await asyncio.gather(*pending, return_exceptions=True)


async def run_calls(
    config: LoadConfig,
    deployment: Deployment,
    tokens: TokenSource,
    *,
    floor_urls: tuple[str, str] | None,
    console: Console,
    stamp: str,
) -> dict[str, Any]:
    rng = random.Random(config.seed)
    recorder = Recorder()
    router = Router()
    env = environment()
    signaling = HttpClient(deployment.signaling_url, size=512)
    policy = HttpClient(deployment.policy_url, size=max(8, config.setup_concurrency))
    floor = None
    if floor_urls is not None:
        console.print("measuring the floor (RabbitMQ one-way, bus hop, Redis round trip)...")
        floor = await measure_floor(*floor_urls)
    groups = config.groups_needed()
    population = pop.plan(groups=groups, group_size=config.group_size, tokens=tokens, rng=rng)
    users = len(population.users)
    groups_made = len(population.groups)
    console.print(f"setting up {users} users in {groups_made} groups (platform facts)...")
    setup_started = time.monotonic()
    grouped = config.scenario == "group"
    facts = await pop.set_up_facts(
        (group_calls.facts if grouped else pop.group_facts)(population),
        policy,
        tokens,
        concurrency=config.setup_concurrency,
    )
    await (group_calls.check if grouped else pop.check_facts)(population, policy)
    took = time.monotonic() - setup_started
    console.print(f"  {facts} facts in {took:.1f}s; connecting devices...")
    await pop.connect_devices(
        population,
        deployment.ws_base,
        router,
        recorder,
        rng,
        min_devices=config.min_devices,
        max_devices=config.max_devices,
    )
    devices = population.devices
    feed = None
    if deployment.notifications_url and config.notify_sample > 0 and not grouped:
        feed = NotificationFeed(deployment.notifications_url)
        sampled = [g for g in population.groups if rng.random() < config.notify_sample]
        for group in sampled or population.groups[:1]:
            for user in group.users:
                await feed.subscribe(user.id, user.token)
        console.print(f"  notification streams open for {len(feed.users)} users")
    console.print(f"  {len(devices)} devices connected; placing calls for {config.duration_s:g}s")
    ctx = Context(config, signaling, feed, router, recorder, population, rng)
    before = deployment.stats()
    self_before = _self_cpu()
    machine_before = machine_cpu_seconds()
    profiler = None
    if config.profile and deployment.local:
        profiler = Profiler(deployment, config.output_dir, stamp)
        profiler.start(config.duration_s * len(config.schedule()))
    call_profiler = None
    if config.cprofile and deployment.local:
        call_profiler = CallProfiler(deployment, cprofile_dir(config.output_dir, stamp))
        call_profiler.start()
    recorder.started = time.monotonic()
    try:
        if config.live:
            with Live(console=console, refresh_per_second=4, transient=False) as view:

                async def refresh() -> None:
                    while True:
                        view.update(
                            live_view.render(
                                recorder,
                                target_rate=config.rate,
                                duration_s=config.duration_s * len(config.schedule()),
                                phase=f"step {len(recorder.steps)}/{len(config.schedule())}",
                            )
                        )
                        await asyncio.sleep(0.25)

                refresher = asyncio.create_task(refresh())
                try:
                    await drive(ctx)
                finally:
                    refresher.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await refresher
        else:
            await drive(ctx)
    finally:
        after = deployment.stats()
        # the profiles end with the load, before the devices close
        cprofile = call_profiler.finish(recorder.placed) if call_profiler is not None else None
        self_cpu = _self_cpu() - self_before
        machine_cpu = machine_cpu_seconds() - machine_before
        env["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        dropped = sum(1 for d in devices if d.closed_unexpectedly)
        await asyncio.gather(*(d.close() for d in devices), return_exceptions=True)
        for client in (signaling, policy):
            await client.close()
        if feed is not None:
            await feed.close()
            for failure in feed.failures:
                recorder.error("notification_stream_broke", failure)
    if dropped:
        recorder.error("ws_closed_by_server", f"{dropped} devices")
    profile = profiler.finish() if profiler is not None else None
    cpu = _cpu_used(before, after)
    cpu["loadtest"] = round(self_cpu, 2)
    ours = sum(cpu.values())
    # The machine is shared: what everything else used (RabbitMQ, Redis, other work).
    cpu["machine_total"] = round(machine_cpu, 2)
    cpu["everything_else"] = round(machine_cpu - ours, 2)
    config_out = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items() if k != "mix"
    }
    config_out["mix"] = format_mix(config.mix)
    report = build_report(
        recorder,
        config=config_out,
        floor=floor,
        environment=env,
        run={
            "rate": config.rate,
            "duration_s": config.duration_s,
            "load_seconds": round(recorder.load_seconds or config.duration_s, 3),
            "users": users,
            "devices": len(devices),
            "deployment": {
                "signaling": deployment.signaling_url,
                "policy": deployment.policy_url,
                "notifications": deployment.notifications_url,
                "started_by_harness": deployment.local,
                "namespace": deployment.namespace,
            },
            "messages_received": router.messages,
            "messages_by_type": router.by_type,
            "late_messages": router.late,
        },
        extra={
            "steps": recorder.step_summary() if len(config.schedule()) > 1 else [],
            "cpu_seconds": cpu,
            # What one call costs each process (services and the generator), all outcomes.
            "cpu_ms_per_call": {
                name: round(seconds * 1000 / recorder.placed, 2)
                for name, seconds in cpu.items()
                if recorder.placed and name not in ("machine_total", "everything_else")
            },
            "memory_mb": {name: round(s["rss_mb"], 1) for name, s in after.items()},
            "profile": profile,
            "cprofile": cprofile,
        },
    )
    out = config.output_dir
    write_json(report, out / f"report-{stamp}.json")
    write_png(recorder, report, out / f"report-{stamp}.png")
    print_summary(report, console)
    for line in cprofile_lines(cprofile or {}):
        console.print(line, markup=False, highlight=False)
    for line in summary_lines(profile or {}):
        console.print(line, markup=False, highlight=False)
    console.print(f"report: {out / f'report-{stamp}.json'}  picture: {out / f'report-{stamp}.png'}")
    return report


async def run_scale(
    scenario: str,
    config: LoadConfig,
    deployment: Deployment,
    tokens: TokenSource,
    *,
    floor_urls: tuple[str, str] | None,
    console: Console,
    stamp: str,
    idle_devices: int,
    idle_hold_s: float,
    storm_calls: int,
    storm_pairs: int,
) -> dict[str, Any]:
    """The idle-devices and missed-storm runs (see tools/loadtest/modes.py)."""
    from tools.loadtest import modes

    env = environment()
    floor = await measure_floor(*floor_urls) if floor_urls is not None else None
    before = deployment.stats()
    machine_before = machine_cpu_seconds()
    run_id = stamp[-7:-1].lower()
    recorder: Recorder | None = None
    if scenario == "idle":
        result = await modes.run_idle(
            deployment,
            tokens,
            devices=idle_devices,
            hold_s=idle_hold_s,
            console=console,
            run_id=run_id,
        )
    else:
        result, recorder = await modes.run_storm(
            deployment,
            tokens,
            calls=storm_calls,
            pairs=storm_pairs,
            rate=config.rate,
            event_timeout_s=config.event_timeout_s,
            console=console,
            run_id=run_id,
        )
    after = deployment.stats()
    env["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    cpu = _cpu_used(before, after)
    cpu["machine_total"] = round(machine_cpu_seconds() - machine_before, 2)
    report = {
        "version": 1,
        "scenario": scenario,
        "environment": env,
        "deployment": {
            "signaling": deployment.signaling_url,
            "started_by_harness": deployment.local,
            "ring_timeout_s": config.ring_timeout_s,
        },
        "floor": floor,
        **result,
        "cpu_seconds": cpu,
        "memory_mb": {name: round(s["rss_mb"], 1) for name, s in after.items()},
    }
    out = config.output_dir
    write_json(report, out / f"{scenario}-{stamp}.json")
    if recorder is not None:
        write_png(
            recorder,
            {
                **report,
                "config": {"rate": config.rate},
                "run": {"calls_placed": result["placed"], "placed_per_s": result["placed_per_s"]},
                "timeline": {m.value: [] for m in (Metric.RING, Metric.CONNECT)},
            },
            out / f"{scenario}-{stamp}.png",
            # a storm has no rings or connects to show: when each missed came, how late,
            # and how long placing took as the calls piled up
            over_time=(Metric.MISSED_LATENESS, Metric.PLACE),
            histograms=([Metric.MISSED_LATENESS], [Metric.PLACE]),
        )
    console.print_json(data={k: v for k, v in report.items() if k not in ("environment",)})
    console.print(f"report: {out / f'{scenario}-{stamp}.json'}")
    return report
