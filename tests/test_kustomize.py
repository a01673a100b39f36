"""tools/kustomize.py, the offline renderer of deploy/k8s. The expected outputs below were
checked against ``kubectl kustomize`` (kustomize v5.5.0), where one was installed:
``python -m tools.kustomize --compare <dir>`` diffs the two."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from tools.kustomize import KustomizeError, render

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: dmcall/web:0.1.0
        envFrom: [{configMapRef: {name: cfg}}, {secretRef: {name: sec}}]
        env: [{name: X, value: "1"}]
"""


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (obj,) = [o for o in objs if o["kind"] == kind]
    return obj


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    write(
        tmp_path,
        {
            "base/dep.yaml": DEPLOYMENT,
            "base/kustomization.yaml": """\
namespace: foo
resources: [dep.yaml]
configMapGenerator:
- name: cfg
  literals: [A=1]
secretGenerator:
- name: sec
  literals: [PASS=secret, LONG=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa]
- name: raw
  options: {disableNameSuffixHash: true}
  literals: [x=y]
labels:
- pairs: {app.kubernetes.io/part-of: dmcall}
""",
            "comp/kustomization.yaml": """\
apiVersion: kustomize.config.k8s.io/v1alpha1
kind: Component
patches:
- patch: |
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: web}
    spec:
      template:
        spec:
          containers:
          - name: web
            env: [{name: Y, value: "2"}, {name: X, value: "one"}]
""",
            "ov/ns.yaml": "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod}\n",
            "ov/kustomization.yaml": """\
namespace: prod
resources: [ns.yaml, ../base]
components: [../comp]
configMapGenerator:
- name: cfg
  behavior: merge
  literals: [A=2, D=4]
images:
- name: dmcall/web
  newName: reg.example.com/web
  newTag: "1.2.3"
replicas:
- name: web
  count: 3
patches:
- target: {kind: Deployment, name: web}
  patch: |
    - op: add
      path: /spec/template/spec/containers/0/env/-
      value: {name: Z, value: "3"}
""",
        },
    )
    return tmp_path


def test_base(tree: Path) -> None:
    objs = render(tree / "base")
    deployment = by_kind(objs, "Deployment")
    assert deployment["metadata"] == {
        "name": "web",
        "namespace": "foo",
        "labels": {"app.kubernetes.io/part-of": "dmcall"},
    }
    # includeTemplates is off: the pods and the selector keep their labels
    assert deployment["spec"]["template"]["metadata"]["labels"] == {"app": "web"}
    names = {o["metadata"]["name"] for o in objs}
    cfg = next(n for n in names if n.startswith("cfg-"))
    sec = next(n for n in names if n.startswith("sec-"))
    assert "raw" in names
    env_from = deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert env_from == [{"configMapRef": {"name": cfg}}, {"secretRef": {"name": sec}}]
    secret = next(o for o in objs if o["metadata"]["name"] == sec)
    assert base64.b64decode(secret["data"]["PASS"]) == b"secret"
    # kustomize wraps long values at 70 characters
    assert secret["data"]["LONG"].count("\n") == 2
    assert base64.b64decode(secret["data"]["LONG"]) == b"a" * 60


def test_overlay(tree: Path) -> None:
    objs = render(tree / "ov")
    namespace = by_kind(objs, "Namespace")
    # the base's labels stay on the base's objects
    assert namespace["metadata"] == {"name": "prod"}
    deployment = by_kind(objs, "Deployment")
    assert deployment["metadata"]["namespace"] == "prod"
    assert deployment["spec"]["replicas"] == 3
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "reg.example.com/web:1.2.3"
    # a strategic merge patch's items come first, merged by name; JSON patch appends
    assert container["env"] == [
        {"name": "Y", "value": "2"},
        {"name": "X", "value": "one"},
        {"name": "Z", "value": "3"},
    ]
    cfg = by_kind(objs, "ConfigMap")
    assert cfg["data"] == {"A": "2", "D": "4"}
    assert container["envFrom"][0]["configMapRef"]["name"] == cfg["metadata"]["name"]
    base_cfg = next(o for o in render(tree / "base") if o["kind"] == "ConfigMap")
    assert cfg["metadata"]["name"] != base_cfg["metadata"]["name"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("namePrefix: x-\n", "unsupported fields ['namePrefix']"),
        ("resources: [missing.yaml]\n", "does not exist"),
        (
            "patches:\n- target: {kind: Service}\n  patch: '[{op: add, path: /a, value: 1}]'\n",
            "matches nothing",
        ),
        (
            "configMapGenerator:\n- name: nope\n  behavior: merge\n  literals: [A=1]\n",
            "merge of nothing",
        ),
    ],
)
def test_what_it_does_not_do_is_refused(tree: Path, line: str, message: str) -> None:
    write(tree, {"bad/dep.yaml": DEPLOYMENT, "bad/kustomization.yaml": "resources: [dep.yaml]\n"})
    with (tree / "bad" / "kustomization.yaml").open("a") as k:
        k.write(line)
    with pytest.raises(KustomizeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        render(tree / "bad")
