"""deploy/k8s/components/monitoring, checked offline: the Grafana dashboard parses and is
shipped to Grafana's sidecar, the PrometheusRule's expressions are well-formed PromQL, and
every metric either names is one a service really exports (its metric objects, imported:
the registry they fill is what ``/metrics`` serves) or one of RabbitMQ's that the
monitoring component has Prometheus scrape.

No process, broker or Redis: the modules that make metrics are imported, nothing is started.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric

from tools import deploy_check
from tools.kustomize import render

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "k8s" / "components" / "monitoring"
DASHBOARD = MONITORING / "dashboards" / "dmcall.json"
ALERTS = MONITORING / "alerts.yaml"
PACKAGES = ("shared", "services")

# RabbitMQ's own metrics (its rabbitmq_prometheus plugin, not a dmcall service): each
# ``/metrics/detailed`` family the rabbitmq ServiceMonitor asks for, and the metrics it
# yields, named ``rabbitmq_detailed_<metric>`` (the plugin's documented list:
# deps/rabbitmq_prometheus/metrics-detailed.md in rabbitmq/rabbitmq-server).
RABBITMQ_DETAILED_FAMILIES = {
    "queue_coarse_metrics": (
        "queue_messages_ready",
        "queue_messages_unacked",
        "queue_messages",
        "queue_process_reductions_total",
    ),
}

# What a sample of each kind of metric family is called on /metrics.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}

Obj = dict[str, Any]


# --------------------------------------------------------------------------- exported names


def _metric_modules() -> Iterator[str]:
    """Every module of the services and shared/ that makes metrics (wherever they live)."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name != "__main__.py" and "prometheus_client" in path.read_text():
                yield ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _sample_names(families: Iterator[Metric]) -> set[str]:
    return {f.name + suffix for f in families for suffix in SUFFIXES[f.type]}


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """The sample names a service's ``/metrics`` can hold: the registry's (the modules'
    metric objects, prometheus_client's process and platform collectors) and the media
    node's scrape-time collector."""
    modules = list(_metric_modules())
    assert "services.media.metrics" in modules
    for name in modules:
        importlib.import_module(name)
    from services.media.metrics import MediaCollector
    from services.media.rooms import Rooms
    from services.media.settings import MediaSettings

    async def publish(event: Any) -> None:
        return None

    rooms = Rooms(MediaSettings(), publish, lambda coroutine: None)  # type: ignore[arg-type,return-value]
    names = _sample_names(REGISTRY.collect()) | _sample_names(MediaCollector(rooms).collect())
    assert {"dmcall_http_requests_total", "process_cpu_seconds_total"} <= names
    return names


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> list[Obj]:
    """The component alone, rendered as an overlay that uses it would."""
    overlay = tmp_path_factory.mktemp("overlay")
    component = os.path.relpath(MONITORING, overlay)
    (overlay / "kustomization.yaml").write_text(f"components: [{component}]\n")
    return render(overlay)


def _rabbitmq_metrics(rendered: list[Obj]) -> set[str]:
    """RabbitMQ's metrics that the rabbitmq ServiceMonitor has Prometheus scrape."""
    (monitor,) = [
        o for o in rendered if o["kind"] == "ServiceMonitor" and o["metadata"]["name"] == "rabbitmq"
    ]
    names = set()
    for endpoint in monitor["spec"]["endpoints"]:
        if endpoint.get("path") == "/metrics/detailed":
            for family in endpoint.get("params", {}).get("family", []):
                names |= {f"rabbitmq_detailed_{m}" for m in RABBITMQ_DETAILED_FAMILIES[family]}
    return names


# --------------------------------------------------------------------------- PromQL

GRAFANA_VARIABLE = re.compile(r"\$(?:\{__\w+\}|__\w+)")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (it must parse, and every selector name one)."""
    tree = promql_parser.parse(GRAFANA_VARIABLE.sub("5m", expr))
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expr!r}"
            names.add(node.name)

    promql_parser.walk(tree, visit)
    return names


def test_the_promql_check_catches_what_it_should() -> None:
    assert metric_names("sum by (le) (rate(a_bucket[$__rate_interval])) / on (pod) b > 0") == {
        "a_bucket",
        "b",
    }
    for broken in ("sum(rate(a[5m])", "rate(a[5q])", "a >", 'a{b="c"'):
        with pytest.raises(ValueError):
            metric_names(broken)


# --------------------------------------------------------------------------- the dashboard


def _panels(panels: list[Obj]) -> Iterator[Obj]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


@pytest.fixture(scope="module")
def dashboard() -> Obj:
    parsed: Obj = json.loads(DASHBOARD.read_text())
    return parsed


def test_the_dashboard_is_shipped_to_grafanas_sidecar(rendered: list[Obj], dashboard: Obj) -> None:
    (config_map,) = [o for o in rendered if o["kind"] == "ConfigMap"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["name"] == "dmcall-grafana-dashboard"  # no hash suffix
    assert json.loads(config_map["data"]["dmcall.json"]) == dashboard


def test_the_dashboard_is_well_formed(dashboard: Obj) -> None:
    assert dashboard["uid"] and dashboard["title"]
    panels = list(_panels(dashboard["panels"]))
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["description"], panel
        assert panel["datasource"]["uid"].strip("${}") in variables
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]


def test_every_metric_on_the_dashboard_is_exported(
    dashboard: Obj, exported: set[str], rendered: list[Obj]
) -> None:
    known = exported | _rabbitmq_metrics(rendered)
    shown: set[str] = set()
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            names = metric_names(target["expr"])
            assert names <= known, f"{panel['title']}: {sorted(names - known)} not exported"
            shown |= names
    # what the dashboard is for (issue: time to ring, missed lateness, placing rate and
    # errors, DLQ depth, GC pauses, media loss and CPU per stream, calls moved)
    assert {
        "dmcall_signaling_time_to_ring_seconds_bucket",
        "dmcall_signaling_missed_lateness_seconds_bucket",
        "dmcall_http_requests_total",
        "rabbitmq_detailed_queue_messages_ready",
        "dmcall_gc_pause_seconds_bucket",
        "dmcall_media_parties_reconnecting",
        "process_cpu_seconds_total",
        "dmcall_signaling_media_moves_total",
    } <= shown


# --------------------------------------------------------------------------- the alerts


@pytest.fixture(scope="module")
def rules() -> list[Obj]:
    (rule,) = yaml.safe_load_all(ALERTS.read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def test_every_alert_is_well_formed_promql_on_exported_metrics(
    rules: list[Obj], exported: set[str], rendered: list[Obj]
) -> None:
    known = exported | _rabbitmq_metrics(rendered)
    alerts = [r["alert"] for r in rules]
    assert len(set(alerts)) == len(alerts)
    for rule in rules:
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= known, f"{rule['alert']}: {sorted(names - known)} not exported"
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_every_alert_is_documented(rules: list[Obj]) -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    for rule in rules:
        assert f"`{rule['alert']}`" in operations, rule["alert"]


def test_an_alert_on_a_metric_nobody_exports_fails(exported: set[str]) -> None:
    assert not metric_names("rate(dmcall_signaling_rings_total[5m]) > 0") <= exported
    # RabbitMQ's aggregated /metrics has no queue label: only the detailed family counts
    assert "rabbitmq_queue_messages_ready" not in exported


def test_the_rules_pass_the_schema_check_and_a_typo_fails_it(rendered: list[Obj]) -> None:
    (rule,) = [o for o in rendered if o["kind"] == "PrometheusRule"]
    assert deploy_check.check_schemas([rule]) == []
    broken = copy.deepcopy(rule)
    broken["spec"]["groups"][0]["rules"][0]["fro"] = "5m"
    (problem,) = deploy_check.check_schemas([broken])
    assert "PrometheusRule/dmcall" in problem and "fro" in problem


def test_rabbitmq_exports_what_the_alerts_read() -> None:
    """The detailed metrics exist only with the rabbitmq_prometheus plugin on."""
    manifests = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "base" / "rabbitmq.yaml").read_text())
    (cluster,) = [o for o in manifests if o["kind"] == "RabbitmqCluster"]
    assert "rabbitmq_prometheus" in cluster["spec"]["rabbitmq"]["additionalPlugins"]
