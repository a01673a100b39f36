"""``python -m tools.loadtest``: load a dmcall deployment and report what it did.

Without service URLs the harness starts the services itself (free ports, local RabbitMQ
and Redis, a namespace of its own) and stops them afterwards. With URLs it talks to that
deployment through the public API only; tokens are minted with the deployment's HS256
secret (``--jwt-secret``, default the development one) or read from ``--tokens``.

Exit status: 0 when nothing was lost and no call failed; 3 when something was lost
(a call that never rang, a notification that never came) or calls failed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import uvloop
from rich.console import Console

from shared import gc_tuning
from shared.settings import DEV_JWT_SECRET
from tools import infra
from tools.loadtest.config import DEFAULT_MIX, LoadConfig, format_mix, parse_mix
from tools.loadtest.deployment import LOAD_ENV, Deployment, raise_fd_limit, start_local
from tools.loadtest.profiling import cprofile_dir
from tools.loadtest.tokens import TokenSource, TokenSourceError


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _devices(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        pair = (int(low), int(high or low))
    except ValueError as exc:
        raise argparse.ArgumentTypeError("devices look like 1-3 or 2") from exc
    if not 1 <= pair[0] <= pair[1] <= 10:
        raise argparse.ArgumentTypeError("devices must be within 1..10, low <= high")
    return pair


def _rates(text: str) -> list[float]:
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError("rates look like 100 or 50,100,200") from exc
    if not rates or any(not 0 < r <= 100_000 for r in rates):
        raise argparse.ArgumentTypeError("each rate must be in (0, 100000]")
    return rates


def _mix(text: str) -> dict:  # type: ignore[type-arg]
    try:
        return parse_mix(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.loadtest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = p.add_argument_group("deployment (give all URLs, or none to start the services)")
    target.add_argument("--signaling-url", help="e.g. http://127.0.0.1:8001")
    target.add_argument("--policy-url", help="e.g. http://127.0.0.1:8002")
    target.add_argument("--notifications-url", help="e.g. http://127.0.0.1:8003 (optional)")
    target.add_argument(
        "--service-env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for services the harness starts (repeatable)",
    )
    target.add_argument(
        "--no-media", action="store_true", help="do not start a media node (accepts then fail)"
    )
    auth = p.add_argument_group("tokens")
    auth.add_argument(
        "--jwt-secret",
        default=os.environ.get("AUTH_JWT_SECRET", DEV_JWT_SECRET),
        help="HS256 secret to mint user and platform tokens (default: AUTH_JWT_SECRET or the "
        "development secret)",
    )
    auth.add_argument("--jwt-issuer", default=os.environ.get("AUTH_JWT_ISSUER"))
    auth.add_argument("--jwt-audience", default=os.environ.get("AUTH_JWT_AUDIENCE"))
    auth.add_argument(
        "--tokens",
        type=Path,
        help="JSON file {'platform': token, 'users': {id: token}} instead of minting",
    )
    p.add_argument(
        "--scenario",
        choices=["calls", "group", "idle", "storm"],
        default="calls",
        help="calls: the call mix at --rate (default); group: group calls at --rate, each "
        "ringing every device of the --group-size - 1 other members, then cancelled (the "
        "mix does not apply); idle: --idle-devices idle WebSockets "
        "on one signaling process, memory per device; storm: --storm-calls calls left "
        "ringing at once, each must go missed once (lateness after ring_deadline); the "
        "SFU's figures are make bench-media's",
    )
    p.add_argument(
        "--group-size",
        type=int,
        choices=range(2, 65),
        default=16,
        metavar="2..64",
        help="members of a group in --scenario group (default 16)",
    )
    scale = p.add_argument_group("scale runs")
    scale.add_argument("--idle-devices", type=int, default=10_000)
    scale.add_argument("--idle-hold", type=float, default=10.0, help="seconds to hold them")
    scale.add_argument("--storm-calls", type=int, default=50_000)
    scale.add_argument("--storm-pairs", type=int, default=1_000, help="caller/callee pairs")
    load = p.add_argument_group("load")
    load.add_argument(
        "--rate",
        type=_rates,
        default=[20.0],
        help="calls started per second; a list (50,100,200) is a ramp, --duration each",
    )
    load.add_argument("--duration", type=float, default=30.0, help="seconds of load (per step)")
    load.add_argument(
        "--mix",
        type=_mix,
        default=dict(DEFAULT_MIX),
        help=f"outcome weights (default {format_mix(DEFAULT_MIX)})",
    )
    load.add_argument("--users", type=int, help="simulated users (default: sized from the rate)")
    load.add_argument("--devices", type=_devices, default=(1, 3), help="devices per user, e.g. 1-3")
    load.add_argument("--answer-delay", type=float, default=0.05, help="seconds before answering")
    load.add_argument("--hold", type=float, default=0.5, help="seconds an answered call lasts")
    load.add_argument(
        "--ring-timeout",
        type=float,
        default=None,
        help="the deployment's ring timeout in seconds (default 3 for started services, where "
        "it is set to this; 60 for a given deployment)",
    )
    load.add_argument("--event-timeout", type=float, default=10.0, help="seconds before lost")
    load.add_argument(
        "--notify-sample",
        type=float,
        default=0.1,
        help="fraction of users whose notification stream (SSE) is watched and checked",
    )
    load.add_argument("--seed", type=int, default=1)
    out = p.add_argument_group("output")
    out.add_argument("--output", type=Path, default=Path("artifacts/loadtest"))
    out.add_argument("--no-live", action="store_true", help="no live display (CI, pipes)")
    out.add_argument("--no-floor", action="store_true", help="skip the broker/Redis floor")
    out.add_argument(
        "--profile",
        action="store_true",
        help="record the started services with py-spy during the load (summary in the report)",
    )
    out.add_argument(
        "--cprofile",
        action="store_true",
        help="run the started services under cProfile and record the load: Python function "
        "calls per call, the layers, the leading functions (summary in the report)",
    )
    out.add_argument(
        "--rabbitmq-url",
        default=os.environ.get("RABBITMQ_URL", infra.DEFAULT_RABBITMQ_URL),
        help="broker for the floor measurement (and for started services)",
    )
    out.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", infra.DEFAULT_REDIS_URL),
        help="Redis for the floor measurement (and for started services)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console()
    urls = (args.signaling_url, args.policy_url)
    if any(urls) and not all(urls):
        console.print("[red]give both --signaling-url and --policy-url, or neither[/red]")
        return 2
    try:
        tokens = (
            TokenSource.from_file(args.tokens)
            if args.tokens
            else TokenSource.from_secret(
                args.jwt_secret, issuer=args.jwt_issuer, audience=args.jwt_audience
            )
        )
    except TokenSourceError as exc:
        console.print(f"[red]{exc}[/red]")
        return 2
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    start = not all(urls)
    ring_timeout = args.ring_timeout if args.ring_timeout is not None else (3.0 if start else 60.0)
    if args.scenario == "storm" and args.ring_timeout is None and start:
        # Every call must still ring when the last one is placed: placing time plus room.
        ring_timeout = math.ceil(args.storm_calls / max(args.rate) * 1.2) + 20.0
    config = LoadConfig(
        signaling_url=args.signaling_url or "",
        policy_url=args.policy_url or "",
        notifications_url=args.notifications_url,
        rate=max(args.rate),
        duration_s=args.duration,
        steps=args.rate if len(args.rate) > 1 else [],
        mix=args.mix,
        users=args.users,
        min_devices=args.devices[0],
        max_devices=args.devices[1],
        answer_delay_s=args.answer_delay,
        hold_s=args.hold,
        ring_timeout_s=ring_timeout,
        event_timeout_s=args.event_timeout,
        notify_sample=args.notify_sample,
        seed=args.seed,
        output_dir=args.output,
        live=not args.no_live and console.is_terminal,
        profile=args.profile,
        cprofile=args.cprofile,
        scenario="group" if args.scenario == "group" else "calls",
    )
    if config.scenario == "group":
        config.group_size = args.group_size
    raise_fd_limit()
    deployment: Deployment
    if start:
        env = {**LOAD_ENV, "SIGNALING_RING_TIMEOUT_S": f"{ring_timeout:g}"}
        console.print("starting the services on free ports...")
        deployment = start_local(
            args.output / f"logs-{stamp}",
            ("policy", "notifications", "signaling", *([] if args.no_media else ["media"])),
            env={**env, **dict(args.service_env)},
            rabbitmq_url=args.rabbitmq_url,
            redis_url=args.redis_url,
            cprofile_dir=cprofile_dir(args.output, stamp) if args.cprofile else None,
        )
        console.print(
            f"  namespace {deployment.namespace}: "
            + ", ".join(f"{p.service} {p.url}" for p in deployment.processes)
        )
    else:
        deployment = Deployment(
            signaling_url=args.signaling_url,
            policy_url=args.policy_url,
            notifications_url=args.notifications_url,
        )
    from tools.loadtest.runner import run_calls, run_scale

    floor_urls = None if args.no_floor else (args.rabbitmq_url, args.redis_url)
    # The generator holds thousands of sockets and calls too: its own collection pauses
    # would show up as latency (a pause of 100 ms or more is logged).
    gc_tuning.tune()
    try:
        if args.scenario in ("calls", "group"):
            report = uvloop.run(
                run_calls(
                    config, deployment, tokens, floor_urls=floor_urls, console=console, stamp=stamp
                )
            )
        else:
            report = uvloop.run(
                run_scale(
                    args.scenario,
                    config,
                    deployment,
                    tokens,
                    floor_urls=floor_urls,
                    console=console,
                    stamp=stamp,
                    idle_devices=args.idle_devices,
                    idle_hold_s=args.idle_hold,
                    storm_calls=args.storm_calls,
                    storm_pairs=args.storm_pairs,
                )
            )
    finally:
        if start:
            deployment.stop()
    if args.scenario not in ("calls", "group"):
        return 3 if sum(report.get("lost", {}).values()) or report.get("errors") else 0
    failed = sum(v for k, v in report["outcomes"].items() if k.endswith("_failed"))
    return 3 if sum(report["lost"].values()) or failed else 0


if __name__ == "__main__":
    sys.exit(main())
