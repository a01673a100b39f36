"""The two scale runs beside the call mix:

- ``idle``: N idle devices on one signaling process (each its own user, one WebSocket),
  held open; reports the signaling process's memory per device (when the harness started
  it) and how quickly a sample of devices still gets an answer to ``ping``.
- ``storm``: N calls placed and left ringing, so that up to N ring at once, each of
  which must go ``missed`` exactly once; reports how late each ``missed`` arrived after
  its ``ring_deadline``. The callers and callees are a limited set of connected pairs
  (each pair with the facts that allow its calls); a pair carries several calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from rich.console import Console

from tools.loadtest.deployment import Deployment, process_stats
from tools.loadtest.devices import Device, Received, Router
from tools.loadtest.http import HttpClient, HttpError
from tools.loadtest.metrics import Metric, Recorder, summarize
from tools.loadtest.population import bounded, connected_pairs
from tools.loadtest.scenarios import parse_time
from tools.loadtest.tokens import TokenSource


async def run_idle(
    deployment: Deployment,
    tokens: TokenSource,
    *,
    devices: int,
    hold_s: float,
    console: Console,
    run_id: str,
) -> dict[str, Any]:
    pongs: dict[str, asyncio.Future[float]] = {}

    def on_pong(item: Received) -> bool:
        if item.type != "pong":
            return False
        future = pongs.pop(item.device_id, None)
        if future is not None and not future.done():
            future.set_result(item.at)
        return True

    router = Router(tap=on_pong)
    pid = deployment.pid("signaling")
    made = [
        Device(
            deployment.ws_base,
            f"li{run_id}-{i}",
            f"li{run_id}-{i}-d0",
            tokens.user(f"li{run_id}-{i}"),
            router,
        )
        for i in range(devices)
    ]
    warm = min(100, devices // 10)
    errors: Counter[str] = Counter()

    def job(device: Device) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            try:
                await device.connect(open_within=60)
            except Exception as exc:
                errors[type(exc).__name__] += 1

        return run

    # A first hundred devices warm the process up (imports, pools, caches), so the
    # baseline and the per-device figure are about sockets, not start-up.
    await bounded([job(d) for d in made[:warm]], 32)
    await asyncio.sleep(2)
    base = process_stats(pid) if pid else None
    console.print(f"connecting {devices} idle devices...")
    started = time.monotonic()
    await bounded([job(d) for d in made[warm:]], 64)
    connect_s = time.monotonic() - started
    connected = process_stats(pid) if pid else None
    console.print(f"  connected in {connect_s:.1f}s; holding {hold_s:g}s")
    await asyncio.sleep(hold_s)
    after = process_stats(pid) if pid else None
    rng = random.Random(1)
    sample = rng.sample(made, min(200, len(made)))
    rtts: list[float] = []
    loop = asyncio.get_running_loop()
    for device in sample:
        future: asyncio.Future[float] = loop.create_future()
        pongs[device.device_id] = future
        sent = time.monotonic()
        try:
            await device.send({"type": "ping"})
            arrived = await asyncio.wait_for(future, 10)
            rtts.append((arrived - sent) * 1000)
        except Exception:
            errors["ping_unanswered"] += 1
    still_open = sum(1 for d in made if not d.closed_unexpectedly)
    await bounded([d.close for d in made], 256)
    report: dict[str, Any] = {
        "devices": devices,
        "connected_and_still_open": still_open,
        "connect_seconds": round(connect_s, 2),
        "connect_retries": sum(d.retries for d in made),
        "connects_per_s": round((devices - warm) / connect_s, 1) if connect_s else None,
        "hold_s": hold_s,
        "ping_rtt_ms": summarize(rtts),
        "errors": dict(errors),
    }
    if base and connected and after:
        per_device_kb = (after["rss_mb"] - base["rss_mb"]) * 1024 / max(1, devices - warm)
        report["signaling_rss_mb"] = {
            "baseline": round(base["rss_mb"], 1),
            "with_devices": round(after["rss_mb"], 1),
        }
        report["memory_per_device_kb"] = round(per_device_kb, 1)
        connecting_cpu = connected["cpu_s"] - base["cpu_s"]
        report["signaling_cpu_ms_per_connect"] = round(
            connecting_cpu * 1000 / max(1, devices - warm), 2
        )
        report["signaling_cpu_percent_while_idle"] = round(
            (after["cpu_s"] - connected["cpu_s"]) / hold_s * 100, 1
        )
    return report


async def run_storm(
    deployment: Deployment,
    tokens: TokenSource,
    *,
    calls: int,
    pairs: int,
    rate: float,
    event_timeout_s: float,
    console: Console,
    run_id: str,
) -> tuple[dict[str, Any], Recorder]:
    recorder = Recorder()
    missed_at: dict[str, Received] = {}
    deadlines: dict[str, float] = {}
    rang_at: dict[str, float] = {}
    duplicates = 0
    expected: list[int] = []  # how many missed to wait for, once every call is placed
    all_missed = asyncio.Event()

    def on_message(item: Received) -> bool:
        nonlocal duplicates
        call_id = item.message.get("call_id")
        if not isinstance(call_id, str):
            return True
        if item.type == "call.state" and item.state == "missed" and item.user.endswith("-a"):
            if call_id in missed_at:
                duplicates += 1
            else:
                missed_at[call_id] = item
                if expected and len(missed_at) >= expected[0]:
                    all_missed.set()
        elif item.type == "call.incoming":
            deadline = parse_time(item.message.get("ring_deadline"))
            if deadline is not None and call_id not in deadlines:
                deadlines[call_id] = deadline
                rang_at[call_id] = item.wall
        return True

    router = Router(tap=on_message)
    signaling = HttpClient(deployment.signaling_url, size=256)
    policy = HttpClient(deployment.policy_url, size=32)
    console.print(f"storm: {pairs} pairs, facts and devices...")
    ws = (deployment.ws_base, deployment.ws_base)
    population = await connected_pairs(
        f"ls{run_id}", pairs, policy, tokens, router, ws, concurrency=32
    )
    groups = population.groups
    placed: list[str] = []
    errors: Counter[str] = Counter()
    console.print(f"storm: placing {calls} calls at {rate:g}/s...")
    start = time.monotonic()
    recorder.started = start
    tasks: set[asyncio.Task[None]] = set()

    async def place(k: int) -> None:
        group = groups[k % pairs]
        caller, callee = group.users
        sent = time.monotonic()
        try:
            response = await signaling.request(
                "POST",
                "/v1/calls",
                token=caller.token,
                json_body={"callee": callee.id, "media": "audio"},
            )
        except HttpError as exc:
            errors[f"http_{exc.kind}"] += 1
            return
        recorder.observe(Metric.PLACE, (time.monotonic() - sent) * 1000)
        if response.status != 202:
            errors[f"place_{response.status}_{response.error_code}"] += 1
            return
        placed.append(response.json()["call_id"])

    for k in range(calls):
        delay = start + k / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(place(k))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    placing_s = time.monotonic() - start
    console.print(f"  placed {len(placed)} in {placing_s:.1f}s; waiting for every missed...")
    expected.append(len(placed))
    if len(missed_at) >= len(placed):
        all_missed.set()
    last_deadline = max(deadlines.values(), default=time.time())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            all_missed.wait(), max(0.0, last_deadline - time.time()) + event_timeout_s
        )
    ringing_peak = _peak_ringing(rang_at, missed_at)
    for call_id in placed:
        got = missed_at.get(call_id)
        deadline = deadlines.get(call_id)
        if got is None:
            recorder.lose("missed_never_came")
            continue
        if deadline is None:
            recorder.lose("never_rang")
            continue
        # Plotted against when the missed arrived (seconds since the storm began).
        recorder.samples.setdefault(Metric.MISSED_LATENESS, []).append(
            (got.at - recorder.started, (got.wall - deadline) * 1000)
        )
    await bounded([d.close for d in population.devices], 256)
    await signaling.close()
    await policy.close()
    return (
        {
            "calls": calls,
            "pairs": pairs,
            "placed": len(placed),
            "placing_seconds": round(placing_s, 1),
            "placed_per_s": round(len(placed) / placing_s, 1) if placing_s else None,
            "peak_ringing_at_once": ringing_peak,
            "connect_retries": sum(d.retries for d in population.devices),
            "missed_received": len(missed_at),
            "duplicate_missed": duplicates,
            "missed_lateness_ms": summarize(recorder.values(Metric.MISSED_LATENESS)),
            "place_ms": summarize(recorder.values(Metric.PLACE)),
            "lost": dict(recorder.lost),
            "errors": dict(errors),
        },
        recorder,
    )


def _peak_ringing(rang_at: dict[str, float], missed_at: dict[str, Received]) -> int:
    """Most calls ringing at the same moment: from the callee's ring to the caller's missed."""
    events: list[tuple[float, int]] = [(at, 1) for at in rang_at.values()]
    events += [(got.wall, -1) for call_id, got in missed_at.items() if call_id in rang_at]
    events.sort()
    ringing = peak = 0
    for _, step in events:
        ringing += step
        peak = max(peak, ringing)
    return peak
