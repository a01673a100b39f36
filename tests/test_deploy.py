"""The deployment, checked offline: deploy/k8s rendered (tools/kustomize.py) and validated
(tools/deploy_check.py), deploy/docker read and checked. No cluster, no Docker engine.

Each check is also shown to fail on a deliberately broken copy, so a green run means
something.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tools import deploy_check
from tools.kustomize import KustomizeError, render

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def rendered(k8s_tree: Path) -> dict[str, list[Obj]]:
    return {
        "base": render(k8s_tree / "base"),
        "dev": render(k8s_tree / "overlays" / "dev"),
        "prod": render(k8s_tree / "overlays" / "prod"),
    }


def find(objs: list[Obj], kind: str, name: str) -> Obj:
    for obj in objs:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"no {kind}/{name}")


def broken(objs: list[Obj], kind: str, name: str, change: Callable[[Obj], None]) -> list[Obj]:
    copied = copy.deepcopy(objs)
    change(find(copied, kind, name))
    return copied


def container(workload: Obj) -> Obj:
    """A workload's (first) container."""
    first: Obj = workload["spec"]["template"]["spec"]["containers"][0]
    return first


def without_env(prefix: str) -> Callable[[Obj], None]:
    """A change that drops the container's env vars whose names start with ``prefix``."""

    def change(workload: Obj) -> None:
        env = container(workload)["env"]
        env[:] = [e for e in env if not e["name"].startswith(prefix)]

    return change


# --------------------------------------------------------------------------- rendering


def test_base_validates_against_the_schemas(rendered: dict[str, list[Obj]]) -> None:
    assert deploy_check.check_schemas(rendered["base"]) == []
    kinds = {o["kind"] for o in rendered["base"]}
    assert {"Deployment", "DaemonSet", "StatefulSet", "RabbitmqCluster", "Ingress"} <= kinds


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_overlay_passes_every_check(rendered: dict[str, list[Obj]], overlay: str) -> None:
    assert deploy_check.check(rendered[overlay]) == []


def test_prod_is_checked_as_production(rendered: dict[str, list[Obj]]) -> None:
    prod, dev = rendered["prod"], rendered["dev"]
    config = next(o for o in prod if o["metadata"]["name"].startswith("dmcall-config"))
    assert config["data"]["DMCALL_ENV"] == "production"
    assert config["data"]["BUS_QUEUE_TYPE"] == "quorum"
    # dev is a development deployment: the production checks would refuse it.
    assert any(
        "DMCALL_ENV is not production" in p for p in deploy_check.check(dev, production=True)
    )


def test_prod_secrets_come_from_files_kept_out_of_git(k8s_tree: Path) -> None:
    ignore = (K8S / "overlays" / "prod" / "secrets" / ".gitignore").read_text()
    assert "*" in ignore.split() and "!*.example" in ignore.split()
    missing = k8s_tree.parent / "missing"
    shutil.copytree(K8S, missing)
    for real in (missing / "overlays" / "prod" / "secrets").glob("*.env"):
        real.unlink()
    with pytest.raises(KustomizeError, match=r"secrets/\w+\.env does not exist"):
        render(missing / "overlays" / "prod")


def test_prod_secret_templates_provide_the_secret_settings(rendered: dict[str, list[Obj]]) -> None:
    secret = next(o for o in rendered["prod"] if o["metadata"]["name"].startswith("dmcall-secrets"))
    assert set(secret["data"]) >= set(deploy_check.SECRET_SETTINGS)


def test_config_keys_are_settings_a_service_reads(rendered: dict[str, list[Obj]]) -> None:
    for overlay in ("dev", "prod"):
        assert deploy_check.unknown_config_keys(rendered[overlay]) == set()


def test_generated_config_names_change_with_content(k8s_tree: Path) -> None:
    """A changed ConfigMap gets a new name, so the pods using it roll."""
    before = render(k8s_tree / "overlays" / "dev")
    tree = k8s_tree.parent / "changed"
    shutil.copytree(k8s_tree, tree)
    with (tree / "base" / "config.env").open("a") as env:
        env.write("BUS_PREFETCH=32\n")
    after = render(tree / "overlays" / "dev")

    def config_name(objs: list[Obj]) -> str:
        deployment = find(objs, "Deployment", "signaling")
        name: str = container(deployment)["envFrom"][0]["configMapRef"]["name"]
        assert any(o["metadata"]["name"] == name for o in objs)
        return name

    assert config_name(before) != config_name(after)
    assert config_name(before).startswith("dmcall-config-")


# --------------------------------------------------------------------------- what it runs


def test_ingress_routes_the_public_prefixes_to_their_services(
    rendered: dict[str, list[Obj]],
) -> None:
    routes = deploy_check.ingress_routes(rendered["prod"])
    assert routes == {
        "/v1/calls": "signaling",
        "/v1/ring-state": "signaling",
        "/v1/ws": "signaling",
        "/v1/ice-servers": "signaling",
        "/": "signaling",
        "/v1/settings": "policy",
        "/v1/permissions": "policy",
        "/v1/notifications": "notifications",
        "/v1/devices": "notifications",
        "/v1/webpush": "notifications",
    }
    # Platform facts stay inside the cluster; rooms are on their media node.
    assert "/v1/platform" not in routes and "/v1/rooms" not in routes
    ingress = find(rendered["prod"], "Ingress", "dmcall")
    annotations = ingress["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_the_web_client_finds_the_services_on_the_public_host(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objs = rendered[overlay]
    config = next(o for o in objs if o["metadata"]["name"].startswith("dmcall-config"))
    ingress = find(objs, "Ingress", "dmcall")
    hosts = {rule["host"] for rule in ingress["spec"]["rules"]}
    tls_hosts = {h for tls in ingress["spec"]["tls"] for h in tls["hosts"]}
    for key in ("SIGNALING_POLICY_URL", "SIGNALING_NOTIFICATIONS_URL"):
        url = config["data"][key]
        assert url.startswith("https://") and url.removeprefix("https://") in hosts & tls_hosts
    origins = json.loads(config["data"]["CORS_ALLOW_ORIGINS"])
    assert origins == ["*"] or {f"https://{h}" for h in hosts} <= set(origins)


def test_stateless_services_autoscale_and_have_disruption_budgets(
    rendered: dict[str, list[Obj]],
) -> None:
    prod = rendered["prod"]
    for name in ("signaling", "policy", "notifications"):
        hpa = find(prod, "HorizontalPodAutoscaler", name)
        assert hpa["spec"]["minReplicas"] >= 2
        find(prod, "PodDisruptionBudget", name)
        spec = find(prod, "Deployment", name)["spec"]["template"]["spec"]
        keys = {c["topologyKey"] for c in spec["topologySpreadConstraints"]}
        assert "topology.kubernetes.io/zone" in keys
        # long enough for uvicorn's 20 s drain plus the preStop pause
        assert spec["terminationGracePeriodSeconds"] >= 25
    for name in ("redis", "rabbitmq"):
        find(prod, "PodDisruptionBudget", name)


def test_rabbitmq_and_redis_are_replicated_and_durable(rendered: dict[str, list[Obj]]) -> None:
    prod = rendered["prod"]
    assert find(prod, "RabbitmqCluster", "rabbitmq")["spec"]["replicas"] == 3
    redis = find(prod, "StatefulSet", "redis")
    assert redis["spec"]["replicas"] >= 2
    conf = next(o for o in prod if o["metadata"]["name"].startswith("redis-config"))
    lines = set(conf["data"]["redis.conf"].splitlines())
    assert {"appendonly yes", "appendfsync everysec", "maxmemory-policy noeviction"} <= lines


def test_media_announces_a_public_url_per_node(rendered: dict[str, list[Obj]]) -> None:
    media = find(rendered["prod"], "DaemonSet", "media")
    spec = media["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    configs = deploy_check._config_objects(rendered["prod"])
    env, problems = deploy_check.container_env(container(media), configs)
    assert problems == []
    assert env["MEDIA_PUBLIC_URL"] == "https://pod-0-spec.nodeName.media.calls.example.com"
    assert env["MEDIA_NODE_ID"] == "pod-0-spec.nodeName"


def test_signaling_mints_turn_credentials_with_coturns_secret(
    rendered: dict[str, list[Obj]],
) -> None:
    configs = deploy_check._config_objects(rendered["prod"])
    signaling = find(rendered["prod"], "Deployment", "signaling")
    env, problems = deploy_check.container_env(container(signaling), configs)
    assert problems == []
    urls = json.loads(env["TURN_URLS"])
    assert urls and all(url.startswith("turn:") for url in urls)
    turn = find(rendered["prod"], "DaemonSet", "turn")
    coturn_env, _ = deploy_check.container_env(container(turn), configs)
    assert env["TURN_SECRET"] == coturn_env["TURN_SECRET"]
    # The URLs name coturn's realm and its listening port.
    conf = next(o for o in rendered["prod"] if o["metadata"]["name"].startswith("turn-config"))
    lines = conf["data"]["turnserver.conf"].splitlines()
    realm = next(line.split("=", 1)[1] for line in lines if line.startswith("realm="))
    port = next(line.split("=", 1)[1] for line in lines if line.startswith("listening-port="))
    assert all(url.split("?")[0] == f"turn:{realm}:{port}" for url in urls)
    # dev hands out no ICE servers (the laptop reaches its media node directly).
    dev_config = next(
        o for o in rendered["dev"] if o["metadata"]["name"].startswith("dmcall-config")
    )
    assert json.loads(dev_config["data"]["TURN_URLS"]) == []


def test_only_the_services_reach_redis_and_rabbitmq(rendered: dict[str, list[Obj]]) -> None:
    services = {"signaling", "policy", "notifications", "media"}
    for overlay, policy_name, peers_expected in (
        ("dev", "redis", {*services, "redis"}),
        ("prod", "redis", {*services, "redis", "redis-sentinel"}),
        ("prod", "redis-sentinel", {*services, "redis", "redis-sentinel"}),
        ("prod", "rabbitmq", {*services, "rabbitmq"}),
    ):
        pods = deploy_check._pods(rendered[overlay])
        policy = find(rendered[overlay], "NetworkPolicy", policy_name)
        peers = [p for rule in policy["spec"]["ingress"] for p in rule.get("from", [])]
        allowed = {
            pod.labels["app.kubernetes.io/name"]
            for peer in peers
            if "podSelector" in peer
            for pod in pods
            if deploy_check.selector_matches(peer["podSelector"], pod.labels)
        }
        assert allowed == peers_expected, (overlay, policy_name)


def test_prod_fails_redis_over_through_three_sentinels_and_dev_has_none(
    rendered: dict[str, list[Obj]],
) -> None:
    config = next(o for o in rendered["prod"] if o["metadata"]["name"].startswith("dmcall-config"))[
        "data"
    ]
    sentinels = config["REDIS_SENTINELS"].split(",")
    assert len(sentinels) == 3 and config["REDIS_SENTINEL_MASTER"] == "dmcall"
    workload = find(rendered["prod"], "StatefulSet", "redis-sentinel")
    assert workload["spec"]["replicas"] == 3
    [script] = container(workload)["args"]
    assert "sentinel monitor dmcall $primary 6379 2" in script  # quorum 2 of 3
    # A Redis pod asks the Sentinels for its role: a restarted old primary rejoins as a replica.
    [redis_script] = container(find(rendered["prod"], "StatefulSet", "redis"))["args"]
    assert "get-master-addr-by-name dmcall" in redis_script
    assert '--replica-announce-ip "$me"' in redis_script
    for text in (script, redis_script):  # both parse as the image's sh would (dash)
        checked = subprocess.run(["sh", "-n", "-c", text], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
    dev_config = next(
        o for o in rendered["dev"] if o["metadata"]["name"].startswith("dmcall-config")
    )["data"]
    assert "REDIS_SENTINELS" not in dev_config
    assert not [o for o in rendered["dev"] if o["metadata"]["name"] == "redis-sentinel"]


# --------------------------------------------------------------------------- broken copies


def test_an_unknown_field_fails(rendered: dict[str, list[Obj]]) -> None:
    def typo(obj: Obj) -> None:
        container(obj)["readinesProbe"] = {}

    problems = deploy_check.check(broken(rendered["dev"], "Deployment", "policy", typo))
    assert any("readinesProbe" in p and "Deployment/policy" in p for p in problems)


def test_an_unknown_field_in_a_custom_resource_fails(rendered: dict[str, list[Obj]]) -> None:
    def typo(obj: Obj) -> None:
        obj["spec"]["replica"] = 3

    problems = deploy_check.check(broken(rendered["prod"], "RabbitmqCluster", "rabbitmq", typo))
    assert any("RabbitmqCluster/rabbitmq" in p and "replica" in p for p in problems)

    def bad_endpoint(obj: Obj) -> None:
        obj["spec"]["endpoints"][0]["intervall"] = "15s"

    problems = deploy_check.check(
        broken(rendered["prod"], "ServiceMonitor", "dmcall", bad_endpoint)
    )
    assert any("ServiceMonitor/dmcall" in p and "intervall" in p for p in problems)


def test_a_broken_manifest_file_fails_the_rendered_checks(k8s_tree: Path) -> None:
    """The same, from a broken file: a Service whose selector matches nothing."""
    tree = k8s_tree.parent / "broken"
    shutil.copytree(k8s_tree, tree)
    path = tree / "base" / "notifications.yaml"
    text = path.read_text()
    assert "  selector:\n    app.kubernetes.io/name: notifications\n" in text
    path.write_text(
        text.replace(
            "  selector:\n    app.kubernetes.io/name: notifications\n",
            "  selector:\n    app.kubernetes.io/name: notification\n",
        )
    )
    problems = deploy_check.check(render(tree / "overlays" / "dev"))
    assert any("Service/notifications: selector" in p for p in problems)


@pytest.mark.parametrize(
    ("kind", "name", "change", "expected"),
    [
        (
            "PodDisruptionBudget",
            "redis",
            lambda o: o["spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/name": "x"}),
            "PodDisruptionBudget/redis: selector matches no pods",
        ),
        (
            "NetworkPolicy",
            "rabbitmq",
            lambda o: o["spec"]["podSelector"]["matchLabels"].update(
                {"app.kubernetes.io/name": "rmq"}
            ),
            "NetworkPolicy/rabbitmq: podSelector matches no pods",
        ),
        (
            "Deployment",
            "signaling",
            lambda o: o["spec"]["selector"]["matchLabels"].update(
                {"app.kubernetes.io/name": "sig"}
            ),
            "Deployment/signaling: selector does not match its pod template",
        ),
        (
            "ServiceMonitor",
            "dmcall",
            lambda o: o["spec"]["endpoints"][0].update({"port": "metrics"}),
            "ServiceMonitor/dmcall: port metrics is not on Service/signaling",
        ),
        (
            "Service",
            "policy",
            lambda o: o["spec"]["ports"][0].update({"targetPort": "web"}),
            "Service/policy: targetPort web is not a port of Deployment/policy",
        ),
        (
            "Deployment",
            "notifications",
            lambda o: container(o)["readinessProbe"]["httpGet"].update({"path": "/ready"}),
            "readinessProbe path /ready is not a route of notifications",
        ),
        (
            "Deployment",
            "policy",
            lambda o: container(o).update({"image": "registry.example.com/dmcall/policy:latest"}),
            "Deployment/policy/policy: image registry.example.com/dmcall/policy:latest is not pinned",
        ),
        (
            "Deployment",
            "policy",
            lambda o: container(o).update({"image": "registry.example.com/dmcall/policy"}),
            "is not pinned by tag",
        ),
        (
            "Deployment",
            "signaling",
            lambda o: container(o)["securityContext"].pop("readOnlyRootFilesystem"),
            "Deployment/signaling/signaling: root filesystem is writable",
        ),
        (
            "Deployment",
            "signaling",
            lambda o: container(o)["ports"][0].update({"containerPort": 8080}),
            "signaling: listens on 8001, not its http port",
        ),
        (
            "DaemonSet",
            "media",
            lambda o: container(o)["env"].reverse(),
            "uses $(NODE_NAME) before it is defined",
        ),
        (
            "DaemonSet",
            "media",
            lambda o: container(o)["livenessProbe"]["httpGet"].pop("scheme"),
            "media: livenessProbe speaks HTTP, the service HTTPS",
        ),
        (
            "DaemonSet",
            "media",
            without_env("DMCALL_TLS_"),
            "media: MEDIA_PUBLIC_URL is https but it serves plain HTTP",
        ),
        (
            "Deployment",
            "signaling",
            without_env("TURN_SECRET"),
            "TURN_SECRET (coturn's static-auth-secret) is required",
        ),
        (
            "Deployment",
            "signaling",
            lambda o: container(o)["env"].append(
                {"name": "TURN_SECRET", "value": "not-the-secret-coturn-has"}
            ),
            "Deployment/signaling/signaling: TURN_SECRET is not the static-auth-secret of "
            "DaemonSet/turn",
        ),
        (
            "HorizontalPodAutoscaler",
            "policy",
            lambda o: o["spec"]["scaleTargetRef"].update({"name": "polic"}),
            "HorizontalPodAutoscaler/policy: scale target",
        ),
        (
            "StatefulSet",
            "redis-sentinel",
            lambda o: o["spec"].update({"replicas": 2}),
            "REDIS_SENTINELS: redis-sentinel-2.redis-sentinel:26379: StatefulSet/redis-sentinel "
            "has no pod redis-sentinel-2",
        ),
        (
            "StatefulSet",
            "redis-sentinel",
            lambda o: container(o).update(
                {"args": [container(o)["args"][0].replace("monitor dmcall", "monitor mymaster")]}
            ),
            "StatefulSet/redis-sentinel: its Sentinels do not monitor 'dmcall'",
        ),
        (
            "Service",
            "redis-sentinel",
            lambda o: o["spec"]["ports"][0].update({"port": 6379}),
            "port 26379 is not a port of redis-sentinel",
        ),
    ],
)
def test_a_broken_copy_fails(
    rendered: dict[str, list[Obj]],
    kind: str,
    name: str,
    change: Callable[[Obj], None],
    expected: str,
) -> None:
    problems = deploy_check.check(broken(rendered["prod"], kind, name, change))
    assert any(expected in p for p in problems), problems


def test_a_missing_or_unparsable_setting_fails(rendered: dict[str, list[Obj]]) -> None:
    def drop(key: str) -> Callable[[Obj], None]:
        def change(obj: Obj) -> None:
            del obj["data"][key]

        return change

    prod = rendered["prod"]
    secret = next(o for o in prod if o["metadata"]["name"].startswith("dmcall-secrets"))
    config = next(o for o in prod if o["metadata"]["name"].startswith("dmcall-config"))
    problems = deploy_check.check(
        broken(prod, "Secret", secret["metadata"]["name"], drop("REDIS_URL"))
    )
    assert any("media: REDIS_URL is not set" in p for p in problems)

    def bad_value(obj: Obj) -> None:
        obj["data"]["BUS_PREFETCH"] = "lots"

    problems = deploy_check.check(broken(prod, "ConfigMap", config["metadata"]["name"], bad_value))
    assert any("policy: settings do not parse" in p and "BUS_PREFETCH" in p for p in problems)

    def other_password(obj: Obj) -> None:
        obj["data"]["REDIS_PASSWORD"] = "b3RoZXI="  # "other"

    redis_auth = next(o for o in prod if o["metadata"]["name"].startswith("redis-auth"))
    problems = deploy_check.check(
        broken(prod, "Secret", redis_auth["metadata"]["name"], other_password)
    )
    assert "REDIS_URL: password is not the one the server is given" in problems

    def wrong_host(obj: Obj) -> None:
        url = "amqp://dmcall:replace-with-the-rabbitmq-password@rabbit.dmcall.svc:5672/"
        obj["data"]["RABBITMQ_URL"] = base64.b64encode(url.encode()).decode()

    problems = deploy_check.check(broken(prod, "Secret", secret["metadata"]["name"], wrong_host))
    assert "RABBITMQ_URL: no Service rabbit for rabbit.dmcall.svc" in problems

    def dev_secret(obj: Obj) -> None:
        obj["data"]["AUTH_JWT_SECRET"] = "c2hvcnQ="  # "short"

    problems = deploy_check.check(broken(prod, "Secret", secret["metadata"]["name"], dev_secret))
    assert any("AUTH_JWT_SECRET must be at least 32 characters" in p for p in problems)

    # Web Push is on in production: without its VAPID key notifications would not start.
    problems = deploy_check.check(
        broken(prod, "Secret", secret["metadata"]["name"], drop("VAPID_PRIVATE_KEY"))
    )
    assert any(
        "notifications: settings do not parse" in p and "VAPID_PRIVATE_KEY" in p for p in problems
    ), problems
    assert not any("policy: settings do not parse" in p for p in problems)


def test_a_required_setting_is_derived_from_the_settings_classes(
    monkeypatch: pytest.MonkeyPatch, rendered: dict[str, list[Obj]]
) -> None:
    """A setting without a default (as a helper may add) must be provided."""
    from pydantic import Field
    from pydantic.fields import FieldInfo

    cls = deploy_check.settings_class("policy")
    field: FieldInfo = Field(validation_alias="POLICY_NEW_REQUIRED_THING")
    fields = {**cls.model_fields, "new_required_thing": field}
    monkeypatch.setattr(cls, "model_fields", fields)
    assert "POLICY_NEW_REQUIRED_THING" in deploy_check.required_settings(cls)
    problems = deploy_check.check_settings(rendered["prod"], production=True)
    assert any("policy: required setting POLICY_NEW_REQUIRED_THING" in p for p in problems)
    assert not any("signaling: required setting" in p for p in problems)


def test_selectors_follow_kubernetes_semantics() -> None:
    labels = {"app": "a", "tier": "x"}
    assert deploy_check.selector_matches({"matchLabels": {"app": "a"}}, labels)
    assert not deploy_check.selector_matches({"matchLabels": {"app": "b"}}, labels)
    expr = {"matchExpressions": [{"key": "app", "operator": "In", "values": ["a", "b"]}]}
    assert deploy_check.selector_matches(expr, labels)
    expr = {"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}
    assert not deploy_check.selector_matches(expr, labels)
    assert deploy_check.image_pinned("redis:7.4.2-bookworm")
    assert deploy_check.image_pinned("registry:5000/a/b@sha256:" + "0" * 64)
    assert not deploy_check.image_pinned("registry:5000/a/b")
    assert not deploy_check.image_pinned("redis:latest")


# --------------------------------------------------------------------------- containers


SERVICE_PORTS = {"signaling": 8001, "policy": 8002, "notifications": 8003, "media": 8004}


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each stage: [(INSTRUCTION, arguments)], continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:  # ARGs before the first FROM are read by build_args
            stages[-1].append((instruction.upper(), rest.strip()))
    return stages


def build_args(path: Path) -> dict[str, str]:
    args = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^ARG (\w+)=(\S+)", line.strip())
        if match:
            args[match.group(1)] = match.group(2)
    return args


@pytest.mark.parametrize("service", list(SERVICE_PORTS))
def test_dockerfile_is_multi_stage_slim_non_root_with_a_healthcheck(service: str) -> None:
    path = DOCKER / f"{service}.Dockerfile"
    stages = dockerfile_stages(path)
    assert len(stages) >= 2
    args = build_args(path)
    for stage in stages:
        image = stage[0][1].split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert deploy_check.image_pinned(image), image
        assert "slim" in image
    final = stages[-1]
    commands = " ".join(arg for ins, arg in final if ins == "RUN")
    assert not re.search(r"build-essential|gcc|apt-get install", commands)
    users = [arg for ins, arg in final if ins == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(ins == "HEALTHCHECK" and "/healthz" in arg for ins, arg in final)
    cmd = next(arg for ins, arg in final if ins == "CMD")
    assert yaml.safe_load(cmd) == ["python", "-m", f"services.{service}"]
    expose = [arg for ins, arg in final if ins == "EXPOSE"]
    assert str(SERVICE_PORTS[service]) in " ".join(expose)
    assert deploy_check.settings_class(service)().port == SERVICE_PORTS[service]
    health = next(arg for ins, arg in final if ins == "HEALTHCHECK")
    assert f"127.0.0.1:{SERVICE_PORTS[service]}/healthz" in health
    assert "/healthz" in deploy_check.service_paths(service)
    # what the build copies exists and is not excluded from the build context
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for ins, arg in stages[0]:
        if ins == "COPY":
            source = arg.split()[0]
            assert (ROOT / source).exists(), source
            assert not any(source.startswith(i) for i in ignored), source
    assert any(arg.startswith(f"services/{service} ") for ins, arg in stages[0] if ins == "COPY")


def test_compose_runs_the_whole_system(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"rabbitmq", "redis", *SERVICE_PORTS} <= set(services)
    for name, port in SERVICE_PORTS.items():
        svc = services[name]
        assert svc["build"]["dockerfile"] == f"deploy/docker/{name}.Dockerfile"
        env = svc["environment"]
        assert env.get("DMCALL_HOST") == "0.0.0.0"
        assert {"RABBITMQ_URL", "REDIS_URL"} <= set(env)
        assert any(str(port) in str(p) for p in svc["ports"])
        assert set(svc["depends_on"]) >= {"rabbitmq", "redis"}
        assert svc["read_only"] is True
        assert svc["image"].endswith(":0.1.0")
        # the settings parse from exactly this environment, on the published port
        for key in list(os.environ):
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, str(value))
        settings = deploy_check.settings_class(name)()
        assert settings.port == port and settings.host == "0.0.0.0"
    for name in ("rabbitmq", "redis"):
        assert deploy_check.image_pinned(services[name]["image"])
        assert "healthcheck" in services[name]
