"""The load-test harness: its pure parts, and a smoke run (a few seconds, low rate) against
real spawned services that must ring every call and lose nothing."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from shared.settings import DEV_JWT_SECRET
from tools.loadtest.__main__ import parser
from tools.loadtest.config import LoadConfig, Outcome, parse_mix
from tools.loadtest.deployment import Deployment
from tools.loadtest.http import HttpClient
from tools.loadtest.metrics import percentile, summarize
from tools.loadtest.runner import run_calls
from tools.loadtest.scenarios import parse_time
from tools.loadtest.tokens import TokenSource, TokenSourceError
from tools.stack import ServiceProcess

pytestmark = pytest.mark.e2e


def test_mix_is_parsed_and_normalised() -> None:
    mix = parse_mix("answered=3, missed=1,denied=0")
    assert mix == {Outcome.ANSWERED: 0.75, Outcome.MISSED: 0.25}
    for bad in ("answered", "ringing=1", "answered=-1", "answered=0", "answered=nan"):
        with pytest.raises(ValueError):
            parse_mix(bad)


def test_media_bench_pairs_each_received_flow_with_its_call_s_sender() -> None:
    """1:1 calls have the same users ("a", "b"): a flow is paired within its own call."""
    from types import SimpleNamespace

    from tools.loadtest.bench_media import _flows, received_record, sent_records
    from tools.media_client import Flow

    def party(frames: int) -> SimpleNamespace:
        sent = {
            kind: Flow(window_packets=2 * frames, window_frames=frames)
            for kind in ("video", "audio")
        }
        return SimpleNamespace(sent=sent)

    got = Flow(window_seqs={7, 8, 10}, window_frames=2)
    records = [
        *sent_records("c1", "a", party(10)),
        *sent_records("c2", "a", party(20)),
        received_record("c2", "a", "b", "video", got),
        received_record("c2", None, "b", "audio", got),  # a slot nobody fills: no flow
    ]
    assert _flows(records) == [
        {
            "call_id": "c2",
            "kind": "video",
            "from": "a",
            "to": "b",
            "sent_packets": 40,
            "sent_frames": 20,
            "received_packets": 3,
            "expected_packets": 4,
            "received_frames": 2,
        }
    ]


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert math.isnan(percentile([], 50))
    assert summarize([]) == {"count": 0}
    assert summarize([2.0, 1.0])["max"] == 2.0


def test_server_times_are_read_as_epoch_seconds() -> None:
    assert parse_time("1970-01-01T00:00:10Z") == 10.0
    assert parse_time("1970-01-01T00:00:10.500000+00:00") == 10.5
    assert parse_time(1_700_000_000_000) == 1_700_000_000.0
    assert parse_time("not a time") is None
    assert parse_time(None) is None


def test_token_file_must_name_platform_and_users(tmp_path: Path) -> None:
    good = tmp_path / "tokens.json"
    good.write_text(json.dumps({"platform": "p", "users": {"alice": "a", "bob": "b"}}))
    source = TokenSource.from_file(good)
    assert source.available_users() == ["alice", "bob"]
    assert source.user("alice") == "a"
    assert source.platform_token() == "p"
    with pytest.raises(TokenSourceError):
        source.user("carol")  # a file never mints
    for body in ("[]", '{"users": {}}', '{"platform": "p", "users": {"bad id!": "x"}}', "{"):
        bad = tmp_path / "bad.json"
        bad.write_text(body)
        with pytest.raises(TokenSourceError):
            TokenSource.from_file(bad)


def test_cli_refuses_bad_options() -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["--devices", "0-3"])
    with pytest.raises(SystemExit):
        parser().parse_args(["--mix", "answered=x"])
    with pytest.raises(SystemExit):
        parser().parse_args(["--rate", "50,-1"])
    args = parser().parse_args(["--rate", "50,100", "--devices", "2-3", "--mix", "missed=1"])
    assert args.rate == [50.0, 100.0]
    assert args.devices == (2, 3)
    assert args.mix == {Outcome.MISSED: 1.0}


async def test_http_client_reports_a_refused_connection() -> None:
    from tools.loadtest.http import HttpError
    from tools.stack import free_port

    client = HttpClient(f"http://127.0.0.1:{free_port()}", timeout=2.0)
    with pytest.raises(HttpError) as caught:
        await client.request("GET", "/healthz")
    assert caught.value.kind == "connect"
    await client.close()


def _deployment(spawn: Callable[..., ServiceProcess], *services: str) -> Deployment:
    """``services`` spawned (with a 1 s ring timeout), as a deployment given by URLs."""
    env = {"RING_TIMEOUT_S": "1", "CALLS_PER_MINUTE": "100000", "LOG_LEVEL": "WARNING"}
    url = {service: spawn(service, **env).url for service in services}
    return Deployment(url["signaling"], url["policy"], url.get("notifications"))


async def _run(
    deployment: Deployment, out: Path, stamp: str, *, floor: bool, **config: Any
) -> dict[str, Any]:
    """A short load run against ``deployment`` (no live view), its report."""
    return await run_calls(
        LoadConfig(
            signaling_url=deployment.signaling_url,
            policy_url=deployment.policy_url,
            notifications_url=deployment.notifications_url,
            ring_timeout_s=1.0,
            event_timeout_s=10.0,
            output_dir=out,
            live=False,
            **config,
        ),
        deployment,
        TokenSource.from_secret(DEV_JWT_SECRET),
        floor_urls=(os.environ["RABBITMQ_URL"], os.environ["REDIS_URL"]) if floor else None,
        console=Console(quiet=True),
        stamp=stamp,
    )


async def test_smoke_run_rings_every_call_and_loses_nothing(
    spawn: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    deployment = _deployment(spawn, "policy", "signaling", "notifications", "media")
    report = await _run(
        deployment,
        tmp_path / "out",
        "smoke",
        floor=True,
        rate=8.0,
        duration_s=3.0,
        mix={outcome: 1.0 / len(Outcome) for outcome in Outcome},
        seed=1,
        hold_s=0.2,
        notify_sample=1.0,
    )
    assert (tmp_path / "out" / "report-smoke.png").stat().st_size > 10_000
    on_disk = json.loads((tmp_path / "out" / "report-smoke.json").read_text())
    assert on_disk["run"]["calls_placed"] == report["run"]["calls_placed"]
    for key in ("config", "environment", "run", "floor", "latency", "outcomes", "errors", "lost"):
        assert key in on_disk, key
    for floor in ("rabbitmq_one_way_ms", "bus_event_hop_ms", "redis_rtt_ms"):
        assert on_disk["floor"][floor]["count"] == 500
    assert report["run"]["calls_placed"] >= 15
    assert report["latency"]["ring_ms"]["count"] >= 5
    assert report["lost"]["never_rang"] == 0
    assert sum(report["lost"].values()) == 0, report["lost"]
    assert report["notifications_checked"] > 0
    failed = {k: v for k, v in report["outcomes"].items() if k.endswith("_failed")}
    assert not failed, (failed, report["errors"], report["error_examples"])
    assert not report["errors"], report["error_examples"]
    # The outcome sequence is drawn from the seed, so every kind of call is in the run.
    for outcome in Outcome:
        assert report["outcomes"].get(outcome.value, 0) >= 1, (outcome, report["outcomes"])


async def test_group_calls_ring_every_device_of_every_invitee(
    spawn: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    deployment = _deployment(spawn, "policy", "signaling")
    report = await _run(
        deployment,
        tmp_path / "out",
        "group",
        floor=False,
        scenario="group",
        group_size=4,
        users=8,
        rate=2.0,
        duration_s=2.0,
        min_devices=1,
        max_devices=2,
    )
    assert (tmp_path / "out" / "report-group.png").stat().st_size > 10_000
    assert not report["errors"], report["error_examples"]
    placed = report["run"]["calls_placed"]
    assert placed >= 3 and report["outcomes"] == {"group_call": placed}, report["outcomes"]
    # Every device of the three invitees rang (one sample each), and nothing was lost.
    assert report["latency"]["group_ring_ms"]["count"] >= 3 * placed
    assert sum(report["lost"].values()) == 0, report["lost"]
    assert report["latency"]["ring_ms"]["count"] == 0  # no 1:1 call in a group run
    targets = {row["target"]: row for row in report["targets"]}
    group_target = targets["group call of 16 at 20/s rings every invitee: p99"]
    assert group_target["met"] is None  # groups of 4 at 2/s: not the target's run
    assert targets["calls lost"]["met"] is True
