"""Checks of rendered Kubernetes manifests, offline: schemas, and what schemas cannot see.

``check(objects)`` returns a list of problems (empty: all good). ``python -m
tools.deploy_check deploy/k8s/overlays/dev`` renders and checks one kustomization.

- every object against the Kubernetes OpenAPI schemas of ``kubernetes-validate``, strict
  about unknown fields; custom resources (RabbitmqCluster, ServiceMonitor) against the
  JSON schemas in deploy/k8s/schemas/;
- selectors (workloads, Services, PodDisruptionBudgets, NetworkPolicies, topology
  spread, ServiceMonitors) match pod or Service labels; HPA targets exist;
- Service target ports and probe ports exist on the selected containers, Ingress
  backends on the Services; HTTP probe paths exist in the service's routes;
- ConfigMaps, Secrets and their keys referenced by pods exist; ``$(VAR)`` references
  name a variable defined before;
- every setting a dmcall service requires is provided (pydantic settings, read from the
  code), the settings parse, and a production deployment sets the critical ones;
  ``RABBITMQ_URL`` and ``REDIS_URL`` name rendered Services with the credentials the
  broker and Redis are given; the ``TURN_SECRET`` signaling mints TURN credentials with
  is the static-auth-secret coturn is given;
- images are pinned by tag or digest (never ``latest``); pods run as non-root with a
  read-only root filesystem, no capabilities and requests and limits.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import importlib
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import jsonschema
import kubernetes_validate
from pydantic import AliasChoices

from tools.kustomize import render

Obj = dict[str, Any]

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "deploy" / "k8s" / "schemas"
K8S_VERSION = "1.37.0"
SERVICES = ("signaling", "policy", "notifications", "media")
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")
CUSTOM_SCHEMAS = {
    ("rabbitmq.com/v1beta1", "RabbitmqCluster"): "rabbitmqcluster.rabbitmq.com.v1beta1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.monitoring.coreos.com.v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.monitoring.coreos.com.v1.json",
}
# What a production deployment must set explicitly, whatever the defaults.
CRITICAL_SETTINGS = ("AUTH_JWT_SECRET", "MEDIA_TOKEN_SECRET", "RABBITMQ_URL", "REDIS_URL")
SECRET_SETTINGS = (
    "AUTH_JWT_SECRET",
    "MEDIA_TOKEN_SECRET",
    "RABBITMQ_URL",
    "REDIS_URL",
    "VAPID_PRIVATE_KEY",
)
# Secrets kept in a Secret of their own (shared with another workload), not dmcall-secrets.
OTHER_SECRET_SETTINGS = ("TURN_SECRET",)
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


# --------------------------------------------------------------------------- model


@dataclass
class Pod:
    """The pods a workload (or an operator) makes: their labels and containers."""

    owner: str
    labels: dict[str, str]
    containers: list[Obj]
    spec: Obj = field(default_factory=dict)


def _name(obj: Obj) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def _pods(objs: list[Obj]) -> list[Pod]:
    pods: list[Pod] = []
    for obj in objs:
        kind = obj.get("kind")
        if kind in WORKLOADS:
            template = obj["spec"]["template"]
            labels = dict(template.get("metadata", {}).get("labels", {}))
            spec = template.get("spec", {})
            containers = spec.get("containers", [])
            if kind == "StatefulSet":
                # Kubernetes labels each StatefulSet pod with its own name.
                for i in range(int(obj["spec"].get("replicas", 1))):
                    pod_name = f"{obj['metadata']['name']}-{i}"
                    pod_labels = {**labels, "statefulset.kubernetes.io/pod-name": pod_name}
                    pods.append(Pod(_name(obj), pod_labels, containers, spec))
            else:
                pods.append(Pod(_name(obj), labels, containers, spec))
        elif kind == "RabbitmqCluster":
            # The operator's pods (a StatefulSet <name>-server) carry these labels.
            name = obj["metadata"]["name"]
            labels = {
                "app.kubernetes.io/name": name,
                "app.kubernetes.io/component": "rabbitmq",
                "app.kubernetes.io/part-of": "rabbitmq",
            }
            ports = [
                {"name": "amqp", "containerPort": 5672},
                {"name": "management", "containerPort": 15672},
                {"name": "prometheus", "containerPort": 15692},
            ]
            pods.append(Pod(_name(obj), labels, [{"name": "rabbitmq", "ports": ports}]))
    return pods


def _services(objs: list[Obj]) -> list[Obj]:
    services = [o for o in objs if o.get("kind") == "Service"]
    for obj in objs:
        if obj.get("kind") == "RabbitmqCluster":
            # The client Service the operator makes, named after the cluster.
            name = obj["metadata"]["name"]
            services.append(
                {
                    "kind": "Service",
                    "metadata": {
                        "name": name,
                        "labels": {
                            "app.kubernetes.io/name": name,
                            "app.kubernetes.io/component": "rabbitmq",
                            "app.kubernetes.io/part-of": "rabbitmq",
                        },
                    },
                    "spec": {
                        "selector": {"app.kubernetes.io/name": name},
                        "ports": [
                            {"name": "amqp", "port": 5672, "targetPort": 5672},
                            {"name": "management", "port": 15672, "targetPort": 15672},
                            {"name": "prometheus", "port": 15692, "targetPort": 15692},
                        ],
                    },
                    "operator": True,
                }
            )
    return services


def selector_matches(selector: Obj | None, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a label set."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _matching_pods(selector: Obj | None, pods: list[Pod]) -> list[Pod]:
    if not selector:
        return []
    return [p for p in pods if selector_matches(selector, p.labels)]


# --------------------------------------------------------------------------- schemas


@functools.cache
def _custom_schema(filename: str) -> Obj:
    schema: Obj = json.loads((SCHEMAS / filename).read_text())
    return schema


def check_schemas(objs: list[Obj]) -> list[str]:
    return [p for obj in objs for p in _schema_problems(json.dumps(obj, sort_keys=True))]


@functools.lru_cache(maxsize=4096)
def _schema_problems(encoded: str) -> tuple[str, ...]:
    """One object's schema problems (cached: the tests check many near-identical copies)."""
    obj = json.loads(encoded)
    custom = CUSTOM_SCHEMAS.get((obj.get("apiVersion", ""), obj.get("kind", "")))
    try:
        if custom:
            jsonschema.validate(obj, _custom_schema(custom))
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        return (f"{_name(obj)}: schema: {exc.message} (at /{where})",)
    except kubernetes_validate.utils.SchemaNotFoundError:
        return (f"{_name(obj)}: no schema for {obj.get('apiVersion')}",)
    return ()


# --------------------------------------------------------------------------- wiring


def _container_ports(pod: Pod) -> list[Obj]:
    return [p for c in pod.containers for p in c.get("ports", [])]


def _port_exists(port: Any, ports: list[Obj]) -> bool:
    if isinstance(port, str) and not port.isdigit():
        return any(p.get("name") == port for p in ports)
    return any(int(p.get("containerPort", -1)) == int(port) for p in ports)


def check_selectors(objs: list[Obj]) -> list[str]:
    problems = []
    pods = _pods(objs)
    services = _services(objs)
    names = {(o.get("kind"), o["metadata"]["name"]) for o in objs}
    for obj in objs:
        kind, spec = obj.get("kind"), obj.get("spec") or {}
        if kind in WORKLOADS:
            labels = spec["template"].get("metadata", {}).get("labels", {})
            if not selector_matches(spec.get("selector"), labels):
                problems.append(f"{_name(obj)}: selector does not match its pod template")
            for tsc in spec["template"]["spec"].get("topologySpreadConstraints", []):
                if not selector_matches(tsc.get("labelSelector"), labels):
                    problems.append(f"{_name(obj)}: topology spread selector misses its pods")
            if kind == "StatefulSet" and ("Service", spec.get("serviceName")) not in names:
                problems.append(f"{_name(obj)}: serviceName {spec.get('serviceName')} is missing")
        elif kind == "Service" and spec.get("selector"):
            hits = _matching_pods({"matchLabels": spec["selector"]}, pods)
            if not hits:
                problems.append(f"{_name(obj)}: selector {spec['selector']} matches no pods")
            for port in spec.get("ports", []):
                target = port.get("targetPort", port["port"])
                for pod in hits:
                    if not _port_exists(target, _container_ports(pod)):
                        problems.append(
                            f"{_name(obj)}: targetPort {target} is not a port of {pod.owner}"
                        )
        elif kind == "PodDisruptionBudget":
            if not _matching_pods(spec.get("selector"), pods):
                problems.append(f"{_name(obj)}: selector matches no pods")
        elif kind == "NetworkPolicy":
            if not _matching_pods(spec.get("podSelector"), pods):
                problems.append(f"{_name(obj)}: podSelector matches no pods")
            for rule in spec.get("ingress", []):
                for peer in rule.get("from", []):
                    if "podSelector" in peer and "namespaceSelector" not in peer:
                        if not _matching_pods(peer["podSelector"], pods):
                            problems.append(f"{_name(obj)}: a from.podSelector matches no pods")
        elif kind == "HorizontalPodAutoscaler":
            ref = spec.get("scaleTargetRef", {})
            if (ref.get("kind"), ref.get("name")) not in names:
                problems.append(f"{_name(obj)}: scale target {ref} does not exist")
        elif kind == "ServiceMonitor":
            monitored = [
                s
                for s in services
                if selector_matches(spec.get("selector"), s["metadata"].get("labels", {}))
            ]
            if not monitored:
                problems.append(f"{_name(obj)}: selector matches no Service")
            for endpoint in spec.get("endpoints", []):
                for svc in monitored:
                    port_names = {p.get("name") for p in svc["spec"].get("ports", [])}
                    if endpoint.get("port") not in port_names:
                        problems.append(
                            f"{_name(obj)}: port {endpoint.get('port')} is not on {_name(svc)}"
                        )
        elif kind == "Ingress":
            problems += _check_ingress(obj, services)
    return problems


def _ingress_backends(obj: Obj) -> Iterator[tuple[str, Obj]]:
    for rule in obj["spec"].get("rules", []):
        for path in rule.get("http", {}).get("paths", []):
            yield path["path"], path["backend"]["service"]


def _check_ingress(obj: Obj, services: list[Obj]) -> list[str]:
    problems = []
    by_name = {s["metadata"]["name"]: s for s in services}
    for path, backend in _ingress_backends(obj):
        svc = by_name.get(backend["name"])
        if svc is None:
            problems.append(f"{_name(obj)}: {path} goes to missing Service {backend['name']}")
            continue
        port = backend.get("port", {})
        ports = svc["spec"].get("ports", [])
        if "name" in port and port["name"] not in {p.get("name") for p in ports}:
            problems.append(f"{_name(obj)}: {path}: {backend['name']} has no port {port}")
        if "number" in port and port["number"] not in {p.get("port") for p in ports}:
            problems.append(f"{_name(obj)}: {path}: {backend['name']} has no port {port}")
    return problems


def ingress_routes(objs: list[Obj]) -> dict[str, str]:
    """Path prefix -> Service name, over every Ingress."""
    return {
        path: backend["name"]
        for obj in objs
        if obj.get("kind") == "Ingress"
        for path, backend in _ingress_backends(obj)
    }


# --------------------------------------------------------------------------- probes


@functools.cache
def service_paths(service: str) -> frozenset[str]:
    """The routes of a dmcall service, from its FastAPI app (built without connecting)."""
    module = importlib.import_module(f"services.{service}.app")
    return frozenset(module.create_app().openapi()["paths"])


def check_probes(objs: list[Obj]) -> list[str]:
    problems = []
    for pod in _pods(objs):
        for container in pod.containers:
            ports = container.get("ports", [])
            for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = container.get(probe_name)
                if not probe:
                    continue
                action = probe.get("httpGet") or probe.get("tcpSocket")
                if action and not _port_exists(action["port"], ports):
                    problems.append(
                        f"{pod.owner}/{container['name']}: {probe_name} port "
                        f"{action['port']} is not a container port"
                    )
                http = probe.get("httpGet")
                if http and container["name"] in SERVICES:
                    if http["path"] not in service_paths(container["name"]):
                        problems.append(
                            f"{pod.owner}/{container['name']}: {probe_name} path "
                            f"{http['path']} is not a route of {container['name']}"
                        )
            if container["name"] in SERVICES and not container.get("readinessProbe"):
                problems.append(f"{pod.owner}/{container['name']}: no readiness probe")
            if container["name"] in SERVICES and not container.get("livenessProbe"):
                problems.append(f"{pod.owner}/{container['name']}: no liveness probe")
    return problems


# --------------------------------------------------------------------------- config


def _data(obj: Obj) -> dict[str, str]:
    if obj["kind"] == "ConfigMap":
        return dict(obj.get("data") or {})
    out = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
    out.update(obj.get("stringData") or {})
    return out


def _config_objects(objs: list[Obj]) -> dict[tuple[str, str], dict[str, str]]:
    return {
        (o["kind"], o["metadata"]["name"]): _data(o)
        for o in objs
        if o.get("kind") in ("ConfigMap", "Secret")
    }


def container_env(
    container: Obj, configs: dict[tuple[str, str], dict[str, str]], pod_name: str = "pod-0"
) -> tuple[dict[str, str], list[str]]:
    """The environment a container starts with (downward API values made up), and the
    problems found on the way: missing ConfigMaps, Secrets, keys; forward references."""
    env: dict[str, str] = {}
    problems: list[str] = []
    for source in container.get("envFrom", []):
        for kind, ref_field in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if ref_field in source:
                ref = source[ref_field]
                data = configs.get((kind, ref["name"]))
                if data is None:
                    if not ref.get("optional"):
                        problems.append(f"envFrom {kind} {ref['name']} does not exist")
                    continue
                env.update({source.get("prefix", "") + k: v for k, v in data.items()})
    for item in container.get("env", []):
        if "value" in item:
            value = str(item["value"])
            for var in _VAR_REF.findall(value):
                if var not in env:
                    problems.append(f"env {item['name']} uses $({var}) before it is defined")
            env[item["name"]] = _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), value)
            continue
        source = item.get("valueFrom", {})
        if "fieldRef" in source:
            env[item["name"]] = f"{pod_name}-{source['fieldRef']['fieldPath']}"
            continue
        for kind, ref_field in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
            if ref_field in source:
                ref = source[ref_field]
                data = configs.get((kind, ref["name"]))
                if data is None or ref["key"] not in data:
                    if not ref.get("optional"):
                        problems.append(f"env {item['name']}: {kind} {ref['name']}/{ref['key']}")
                    continue
                env[item["name"]] = data[ref["key"]]
    for arg in [*container.get("command", []), *container.get("args", [])]:
        for var in _VAR_REF.findall(str(arg)):
            if var not in env:
                problems.append(f"command/args use $({var}), which is not defined")
    return env, problems


def check_references(objs: list[Obj]) -> list[str]:
    problems = []
    configs = _config_objects(objs)
    for pod in _pods(objs):
        for container in pod.containers:
            _, found = container_env(container, configs)
            problems += [f"{pod.owner}/{container['name']}: {p}" for p in found]
        for volume in pod.spec.get("volumes", []):
            if "configMap" in volume and ("ConfigMap", volume["configMap"]["name"]) not in configs:
                problems.append(f"{pod.owner}: volume ConfigMap {volume['configMap']['name']}")
            if "secret" in volume and ("Secret", volume["secret"]["secretName"]) not in configs:
                problems.append(f"{pod.owner}: volume Secret {volume['secret']['secretName']}")
    return problems


def settings_class(service: str) -> type:
    from shared.settings import CommonSettings

    module = importlib.import_module(f"services.{service}.settings")
    for value in vars(module).values():
        if (
            isinstance(value, type)
            and issubclass(value, CommonSettings)
            and value is not CommonSettings
            and value.__module__ == module.__name__
        ):
            return value
    raise LookupError(f"no settings class in services.{service}.settings")


def env_names(cls: type) -> dict[str, tuple[str, ...]]:
    """Field name -> the environment variables that set it."""
    prefix = str(cls.model_config.get("env_prefix", ""))  # type: ignore[attr-defined]
    names: dict[str, tuple[str, ...]] = {}
    for name, info in cls.model_fields.items():  # type: ignore[attr-defined]
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names[name] = tuple(str(c).upper() for c in alias.choices)
        elif isinstance(alias, str):
            names[name] = (alias.upper(),)
        else:
            names[name] = ((prefix + name).upper(),)
    return names


def required_settings(cls: type) -> list[str]:
    """The variables a service cannot start without (fields without a default)."""
    names = env_names(cls)
    fields = cls.model_fields  # type: ignore[attr-defined]
    return [names[n][0] for n, info in fields.items() if info.is_required()]


def known_setting_names() -> set[str]:
    return {n for s in SERVICES for names in env_names(settings_class(s)).values() for n in names}


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def check_settings(objs: list[Obj], *, production: bool) -> list[str]:
    """Each dmcall container gets every setting it requires, they parse, and (production)
    the critical ones are set explicitly, secrets from a Secret."""
    problems = []
    configs = _config_objects(objs)
    secret_keys = {k for (kind, _), data in configs.items() if kind == "Secret" for k in data}
    seen = set()
    for pod in _pods(objs):
        for container in pod.containers:
            service = container["name"]
            if service not in SERVICES:
                continue
            seen.add(service)
            where = f"{pod.owner}/{service}"
            env, _ = container_env(container, configs)
            cls = settings_class(service)
            for name in required_settings(cls):
                if name not in env:
                    problems.append(f"{where}: required setting {name} is not provided")
            try:
                with _environment(env):
                    settings = cls()
            except Exception as exc:
                problems.append(f"{where}: settings do not parse: {exc}")
                continue
            http = [p for p in container.get("ports", []) if p.get("name") == "http"]
            if not http or int(http[0]["containerPort"]) != settings.port:
                problems.append(f"{where}: listens on {settings.port}, not its http port")
            if settings.host != "0.0.0.0":
                problems.append(f"{where}: DMCALL_HOST is {settings.host}, not 0.0.0.0")
            scheme = "HTTPS" if settings.tls_cert_file else "HTTP"
            for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
                http_get = (container.get(probe_name) or {}).get("httpGet")
                spoken = (http_get or {}).get("scheme", "HTTP")
                if http_get and spoken != scheme:
                    problems.append(f"{where}: {probe_name} speaks {spoken}, the service {scheme}")
            public_url = env.get("MEDIA_PUBLIC_URL", "")
            if public_url.startswith("https://") and not settings.tls_cert_file:
                problems.append(f"{where}: MEDIA_PUBLIC_URL is https but it serves plain HTTP")
            if public_url.startswith("http://") and settings.tls_cert_file:
                problems.append(f"{where}: MEDIA_PUBLIC_URL is http but it serves HTTPS")
            if not production:
                continue
            if public_url.startswith("http://"):
                problems.append(f"{where}: MEDIA_PUBLIC_URL is plain http in production")
            if env.get("DMCALL_ENV") != "production":
                problems.append(f"{where}: DMCALL_ENV is not production")
            for name in CRITICAL_SETTINGS:
                if name not in env:
                    problems.append(f"{where}: {name} is not set")
            for name in (*SECRET_SETTINGS, *OTHER_SECRET_SETTINGS):
                if name in env and name not in secret_keys:
                    problems.append(f"{where}: {name} does not come from a Secret")
    for service in set(SERVICES) - seen:
        problems.append(f"no workload runs {service}")
    return problems


SETTING_PREFIXES = (
    "DMCALL_",
    "BUS_",
    "SIGNALING_",
    "POLICY_",
    "NOTIFICATIONS_",
    "MEDIA_",
    "TURN_",
)


def unknown_config_keys(objs: list[Obj]) -> set[str]:
    """Keys of dmcall-config, and setting-like variables of the services' containers, that
    no service's settings read (a typo, or a setting gone)."""
    keys: set[str] = set()
    for obj in objs:
        if obj.get("kind") == "ConfigMap" and obj["metadata"]["name"].startswith("dmcall-config"):
            keys |= set(obj.get("data") or {})
    for pod in _pods(objs):
        for container in pod.containers:
            if container["name"] in SERVICES:
                names = {e["name"] for e in container.get("env", [])}
                keys |= {n for n in names if n.startswith(SETTING_PREFIXES)}
    return keys - known_setting_names()


def _service_at(url: str, objs: list[Obj]) -> tuple[Obj | None, str]:
    """The rendered Service a URL's host names (``name``, ``name.ns.svc[.cluster.local]``)."""
    host = urlsplit(url).hostname or ""
    name, _, rest = host.partition(".")
    namespace = rest.split(".")[0] if rest else None
    for svc in _services(objs):
        if svc["metadata"]["name"] != name:
            continue
        if namespace and svc["metadata"].get("namespace", namespace) != namespace:
            return None, f"{host} is in namespace {namespace}, the Service is not"
        return svc, ""
    return None, f"no Service {name} for {host}"


def check_connections(objs: list[Obj]) -> list[str]:
    """RABBITMQ_URL and REDIS_URL name rendered Services and ports, with the credentials
    the broker and Redis are given (rabbitmq-credentials, redis-auth)."""
    problems = []
    configs = _config_objects(objs)

    def secret(prefix: str) -> dict[str, str] | None:
        found = [d for (k, n), d in configs.items() if k == "Secret" and n.startswith(prefix)]
        return found[0] if found else None

    settings = secret("dmcall-secrets")
    if settings is None:
        return ["no dmcall-secrets Secret"]
    for key, credentials, user_key, password_key in (
        ("RABBITMQ_URL", secret("rabbitmq-credentials"), "username", "password"),
        ("REDIS_URL", secret("redis-auth"), None, "REDIS_PASSWORD"),
    ):
        url = settings.get(key)
        if url is None:
            continue
        svc, why = _service_at(url, objs)
        if svc is None:
            problems.append(f"{key}: {why}")
            continue
        parts = urlsplit(url)
        ports = {p["port"] for p in svc["spec"].get("ports", [])}
        if parts.port not in ports:
            problems.append(
                f"{key}: port {parts.port} is not a port of Service {svc['metadata']['name']}"
            )
        if credentials is None:
            problems.append(f"{key}: the server's credentials Secret is missing")
            continue
        if user_key and unquote(parts.username or "") != credentials.get(user_key):
            problems.append(f"{key}: user is not the one the server is given")
        if unquote(parts.password or "") != credentials.get(password_key):
            problems.append(f"{key}: password is not the one the server is given")
    return problems


def check_sentinels(objs: list[Obj]) -> list[str]:
    """With REDIS_SENTINELS, each entry names a pod of a rendered StatefulSet through its
    headless Service (``<set>-<ordinal>.<service>:<port>``), the Sentinels run in those
    pods, there are at least three, and they monitor REDIS_SENTINEL_MASTER."""
    configs = _config_objects(objs)
    config = next((d for (k, n), d in configs.items() if n.startswith("dmcall-config")), {})
    listed = [e.strip() for e in config.get("REDIS_SENTINELS", "").split(",") if e.strip()]
    if not listed:
        return []
    master = config.get("REDIS_SENTINEL_MASTER", "")
    problems = []
    sets = {
        o["metadata"]["name"]: o for o in objs if o.get("kind") == "StatefulSet" and "spec" in o
    }
    headless = {
        svc["metadata"]["name"]: svc
        for svc in _services(objs)
        if svc["spec"].get("clusterIP") == "None"
    }
    watched: set[str] = set()
    for entry in listed:
        host, _, port = entry.rpartition(":")
        pod, _, service = host.partition(".")
        owner, _, ordinal = pod.rpartition("-")
        workload = sets.get(owner)
        svc = headless.get(service.split(".")[0])
        if workload is None or not ordinal.isdigit() or svc is None:
            problems.append(f"REDIS_SENTINELS: {entry} is not a StatefulSet pod's stable name")
            continue
        if workload["spec"].get("serviceName") != svc["metadata"]["name"]:
            problems.append(f"REDIS_SENTINELS: {entry}: {owner}'s serviceName is not {service}")
        if int(ordinal) >= workload["spec"].get("replicas", 1):
            problems.append(f"REDIS_SENTINELS: {entry}: StatefulSet/{owner} has no pod {pod}")
        if not port.isdigit() or int(port) not in {p["port"] for p in svc["spec"]["ports"]}:
            problems.append(f"REDIS_SENTINELS: {entry}: port {port} is not a port of {service}")
        watched.add(owner)
    if len(set(listed)) < 3:
        problems.append("REDIS_SENTINELS: fewer than three Sentinels (a quorum of 2 needs 3)")
    for owner in sorted(watched & set(sets)):
        spec = sets[owner]["spec"]["template"]["spec"]
        script = " ".join(
            " ".join([*c.get("command", []), *c.get("args", [])]) for c in spec["containers"]
        )
        if f"sentinel monitor {master} " not in script:
            problems.append(f"StatefulSet/{owner}: its Sentinels do not monitor {master!r}")
    return problems


def check_turn(objs: list[Obj]) -> list[str]:
    """Signaling hands out TURN URLs only with credentials coturn accepts: the secret it
    mints them with is the ``--static-auth-secret`` every coturn container is given."""
    problems = []
    configs = _config_objects(objs)
    relays = [
        (pod.owner, container)
        for pod in _pods(objs)
        for container in pod.containers
        if "--static-auth-secret=$(TURN_SECRET)" in container.get("args", [])
    ]
    relay_secrets = {owner: container_env(c, configs)[0].get("TURN_SECRET") for owner, c in relays}
    for pod in _pods(objs):
        for container in pod.containers:
            if container["name"] != "signaling":
                continue
            env, _ = container_env(container, configs)
            try:
                urls = json.loads(env.get("TURN_URLS", "[]"))
            except ValueError:
                continue  # check_settings reports it
            if not any(str(u).startswith(("turn:", "turns:")) for u in urls):
                continue
            where = f"{pod.owner}/signaling"
            for owner, secret in relay_secrets.items():
                if env.get("TURN_SECRET") != secret:
                    problems.append(
                        f"{where}: TURN_SECRET is not the static-auth-secret of {owner}"
                    )
    return problems


# --------------------------------------------------------------------------- hygiene


def image_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return False
    return last.rsplit(":", 1)[1] not in ("", "latest")


def check_hygiene(objs: list[Obj]) -> list[str]:
    problems = []
    for obj in objs:
        if obj.get("kind") == "RabbitmqCluster" and not image_pinned(obj["spec"].get("image", "")):
            problems.append(f"{_name(obj)}: image is not pinned by tag")
        if obj.get("kind") not in WORKLOADS:
            continue
        spec = obj["spec"]["template"]["spec"]
        if not spec.get("securityContext", {}).get("runAsNonRoot"):
            problems.append(f"{_name(obj)}: pods may run as root")
        for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
            where = f"{_name(obj)}/{container['name']}"
            if not image_pinned(container.get("image", "")):
                problems.append(f"{where}: image {container.get('image')} is not pinned by tag")
            sc = container.get("securityContext", {})
            if not sc.get("readOnlyRootFilesystem"):
                problems.append(f"{where}: root filesystem is writable")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: privilege escalation is allowed")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: capabilities are not dropped")
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(resources.get(part, {})):
                    problems.append(f"{where}: no cpu/memory {part}")
    return problems


# --------------------------------------------------------------------------- all


def check(objs: list[Obj], *, production: bool | None = None) -> list[str]:
    """Every check on a deployable rendering (an overlay)."""
    if production is None:
        production = any(
            o.get("kind") == "ConfigMap"
            and o["metadata"]["name"].startswith("dmcall-config")
            and (o.get("data") or {}).get("DMCALL_ENV") == "production"
            for o in objs
        )
    return [
        *check_schemas(objs),
        *check_selectors(objs),
        *check_probes(objs),
        *check_references(objs),
        *check_settings(objs, production=production),
        *check_connections(objs),
        *check_sentinels(objs),
        *check_turn(objs),
        *check_hygiene(objs),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description="Render a kustomization and check it.")
    parser.add_argument("directory", type=Path)
    args = parser.parse_args()
    problems = check(render(args.directory))
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
