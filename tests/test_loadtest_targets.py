"""The load harness's targets table: each target read from a report, met or not, and
never shown as met when the run did not measure it. Pure: reports are dicts."""

from __future__ import annotations

from typing import Any

from tools.loadtest.targets import evaluate


def _rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["target"]: row for row in evaluate(report)}


def _answered(cpu: dict[str, float], **extra: Any) -> dict[str, Any]:
    return {"config": {"mix": "answered=1"}, "cpu_ms_per_call": cpu, **extra}


def test_cpu_targets_are_read_per_kind_of_process_and_summed_over_its_processes() -> None:
    rows = _rows(
        _answered(
            {
                "signaling:8001": 1.5,
                "signaling:8011": 0.75,
                "policy:8002": 0.9,
                "notifications:8003": 1.0,
                "media:8004": 0.5,
                "rabbitmq": 1.0,
                "redis": 0.5,
                "loadtest": 9.0,
            }
        )
    )
    assert rows["signaling CPU per answered call"]["figure"] == 2.25
    assert rows["signaling CPU per answered call"]["met"] is True
    assert rows["policy CPU per answered call"]["met"] is False
    assert rows["notifications CPU per answered call"]["met"] is True
    everything = rows["dmcall + RabbitMQ + Redis CPU per answered call"]
    assert everything["figure"] == 2.25 + 0.9 + 1.0 + 0.5 + 1.0 + 0.5  # not the generator
    assert everything["met"] is True


def test_the_reports_own_mix_in_percent_counts_as_answered_only() -> None:
    report = _answered({"signaling:8001": 2.0})
    report["config"]["mix"] = "answered=100"  # what format_mix writes into the report
    assert _rows(report)["signaling CPU per answered call"]["met"] is True


def test_cpu_per_answered_call_is_not_claimed_from_another_mix() -> None:
    report = _answered({"signaling:8001": 1.0, "rabbitmq": 0.1, "redis": 0.1})
    report["config"]["mix"] = "answered=0.5,missed=0.5"
    row = _rows(report)["signaling CPU per answered call"]
    assert row["figure"] is None and row["met"] is None


def test_without_the_engines_cpu_the_total_is_not_measured() -> None:
    rows = _rows(_answered({"signaling:8001": 1.0, "policy:8002": 0.1, "notifications:8003": 0.1}))
    assert rows["dmcall + RabbitMQ + Redis CPU per answered call"]["met"] is None


def _step(rate: float, placed: float, p50: float, p99: float) -> dict[str, Any]:
    return {"target_rate": rate, "placed_per_s": placed, "ring_ms": {"p50": p50, "p99": p99}}


def test_ring_targets_hold_only_at_200_calls_per_second_placed_in_full() -> None:
    floor = {"bus_event_hop_ms": {"p50": 0.9, "p99": 4.0}}
    met = _rows({"steps": [_step(100, 100, 3, 9), _step(200, 199, 4.5, 25)], "floor": floor})
    assert met["time to ring p50 at 200 calls/s"]["met"] is True
    assert met["time to ring p50 at 200 calls/s"]["floor"] == 1.8
    assert met["time to ring p99 at 200 calls/s"]["met"] is False
    assert met["time to ring p99 at 200 calls/s"]["floor"] == 8.0
    behind = _rows({"steps": [_step(200, 141, 1.0, 2.0)]})  # 200 asked, 141 placed
    assert behind["time to ring p50 at 200 calls/s"]["met"] is None
    single = _rows({"run": {"rate": 200, "placed_per_s": 200}, "latency": {"ring_ms": {"p50": 6}}})
    assert single["time to ring p50 at 200 calls/s"]["met"] is False


def test_sustained_rate_is_the_highest_step_placed_in_full_under_100_ms() -> None:
    steps = [_step(100, 100, 5, 30), _step(200, 200, 9, 99), _step(400, 390, 20, 80)]
    steps.append(_step(800, 500, 900, 2000))
    row = _rows({"steps": steps})["calls/s sustained before ring p99 passes 100 ms"]
    assert row["figure"] == 400 and row["met"] is True
    low = _rows({"steps": steps[:2]})["calls/s sustained before ring p99 passes 100 ms"]
    assert low["figure"] == 200 and low["met"] is False
    assert _rows({})["calls/s sustained before ring p99 passes 100 ms"]["met"] is None


def test_losses_count_every_kind() -> None:
    assert _rows({"lost": {"never_rang": 0}})["calls lost"]["met"] is True
    assert _rows({"lost": {"never_rang": 0, "notification": 2}})["calls lost"]["figure"] == 2


def test_group_ring_is_read_from_a_run_of_groups_of_16_placed_in_full_at_20_per_second() -> None:
    name = "group call of 16 at 20/s rings every invitee: p99"

    def run(group_size: int, placed_per_s: float, p99: float) -> dict[str, Any]:
        return {
            "config": {"scenario": "group", "group_size": group_size, "mix": "answered=1"},
            "run": {"placed_per_s": placed_per_s},
            "latency": {"group_ring_ms": {"p99": p99}},
            "cpu_ms_per_call": {"signaling:8001": 1.0},
        }

    assert _rows(run(16, 20.0, 12.0))[name]["met"] is True
    assert _rows(run(16, 19.5, 31.0))[name]["met"] is False
    assert _rows(run(4, 20.0, 12.0))[name]["met"] is None  # smaller groups
    assert _rows(run(16, 12.0, 12.0))[name]["met"] is None  # not placed in full
    # a group run's CPU is not an answered 1:1 call's, whatever its mix says
    assert _rows(run(16, 20.0, 12.0))["signaling CPU per answered call"]["met"] is None
