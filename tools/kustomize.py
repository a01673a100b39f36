"""A small kustomize renderer for exactly the features deploy/k8s uses, so the manifests
render offline where no ``kustomize``/``kubectl`` can be installed from the allowed
registries (Debian's ``kubernetes-client`` is 1.20, whose kustomize predates components).

Supported (anything else in a kustomization is refused, never silently ignored):

- ``resources`` (files, or directories holding a ``kustomization.yaml``) and
  ``components`` (directories of ``kind: Component``), applied in kustomize's order:
  resources, then components, then this kustomization's own generators and transformers;
- ``namespace``; ``labels`` (``pairs`` with ``includeSelectors: false``, optionally
  ``includeTemplates``); ``commonAnnotations``;
- ``images`` (``name`` -> ``newName``/``newTag``) on containers and initContainers;
- ``replicas`` (``name``/``count``);
- ``patches`` (file ``path`` or inline ``patch``; strategic merge patches, maps merged and
  lists of ``containers``/``env``/``volumes``/``volumeMounts``... merged by ``name``, or
  JSON 6902 ``add``/``replace``/``remove`` with a ``target``);
- ``configMapGenerator``/``secretGenerator`` (``literals``, ``envs``, ``files``;
  ``behavior: create|merge|replace``; ``options.disableNameSuffixHash``, ``options.labels``;
  ``generatorOptions``) with kustomize's content-hash suffix, and the references to
  generated names rewritten in pod specs (``envFrom``, ``env.valueFrom``, ``volumes``).

Where a real ``kubectl`` is installed, ``python -m tools.kustomize --compare <dir>`` diffs
the two renderings; they agree object for object except the generated names' hash
suffixes (see :func:`_name_hash`).
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {
    "apiVersion",
    "kind",
    "metadata",
    "resources",
    "components",
    "namespace",
    "labels",
    "commonAnnotations",
    "images",
    "replicas",
    "patches",
    "configMapGenerator",
    "secretGenerator",
    "generatorOptions",
}
# Lists a strategic merge patch merges item by item, keyed by this field (as Kubernetes
# does for these fields); any other list in a patch replaces the original.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "envFrom": None,  # no merge key in Kubernetes either: replaced
    "volumes": "name",
    "volumeMounts": "name",
    "imagePullSecrets": "name",
    "topologySpreadConstraints": "topologyKey",
}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "IngressClass",
}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
SCALABLE = {"Deployment", "StatefulSet", "ReplicaSet", "ReplicationController"}


class KustomizeError(Exception):
    """The kustomization uses something this renderer does not do, or is wrong."""


# --------------------------------------------------------------------------- loading


def _load_yaml_docs(path: Path) -> list[Obj]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        raise KustomizeError(f"{path}: {exc}") from exc
    for doc in docs:
        if not isinstance(doc, dict):
            raise KustomizeError(f"{path}: a document is not a mapping")
    return docs


def _kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise KustomizeError(f"{directory}: no kustomization.yaml")


def _key(obj: Obj) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    return obj.get("kind", ""), meta.get("namespace", ""), meta.get("name", "")


# --------------------------------------------------------------------------- generators


def _read_file(path: Path) -> str:
    if not path.is_file():
        raise KustomizeError(f"{path} does not exist")
    return path.read_text()


def _read_env_file(path: Path) -> dict[str, str]:
    data: dict[str, str] = {}
    for number, raw in enumerate(_read_file(path).splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise KustomizeError(f"{path}:{number}: not KEY=value")
        name, value = line.split("=", 1)
        data[name.strip()] = value
    return data


def _generator_data(gen: Obj, base: Path) -> dict[str, str]:
    unknown = set(gen) - {"name", "behavior", "literals", "envs", "files", "options", "type"}
    if unknown:
        raise KustomizeError(f"generator {gen.get('name')}: unsupported {sorted(unknown)}")
    data: dict[str, str] = {}
    for env in gen.get("envs", []):
        data.update(_read_env_file(base / env))
    for spec in gen.get("files", []):
        name, _, rel = spec.partition("=") if "=" in spec else (Path(spec).name, "", spec)
        data[name] = _read_file(base / rel)
    for literal in gen.get("literals", []):
        name, sep, value = literal.partition("=")
        if not sep:
            raise KustomizeError(f"generator {gen.get('name')}: literal {literal!r} has no '='")
        data[name] = value
    return data


def _go_json(value: Any) -> str:
    """json.Marshal's bytes: sorted keys, no spaces, HTML characters escaped."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escaped)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _name_hash(obj: Obj) -> str:
    """A content hash in kustomize's alphabet (10 characters of a sha256).

    kustomize hashes its own internal encoding, so the suffix differs from the one
    ``kustomize build`` gives; what matters is the same: it changes with the content,
    so a changed ConfigMap or Secret rolls the pods that use it.
    """
    if obj["kind"] == "ConfigMap":
        encoded: Obj = {"kind": "ConfigMap", "name": obj["metadata"]["name"]}
        encoded["data"] = obj.get("data") or ""
    else:
        encoded = {"kind": "Secret", "type": obj.get("type", ""), "name": obj["metadata"]["name"]}
        encoded["data"] = obj.get("data") or ""
    digest = hashlib.sha256(_go_json(encoded).encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _generated_object(kind: str, name: str, data: dict[str, str], options: Obj, type_: str) -> Obj:
    metadata: Obj = {"name": name}
    if options.get("labels"):
        metadata["labels"] = dict(options["labels"])
    if options.get("annotations"):
        metadata["annotations"] = dict(options["annotations"])
    obj: Obj = {"apiVersion": "v1", "kind": kind, "metadata": metadata}
    if kind == "Secret":
        obj["type"] = type_
    _set_data(obj, data)
    return obj


def _set_data(obj: Obj, data: dict[str, str]) -> None:
    if obj["kind"] == "ConfigMap":
        obj["data"] = dict(sorted(data.items()))
    else:
        obj["data"] = {k: _encode_base64(v) for k, v in sorted(data.items())}


def _encode_base64(value: str) -> str:
    """Base64 the way kustomize writes Secret data: lines of 70 once it is that long."""
    encoded = base64.b64encode(value.encode()).decode()
    if len(encoded) < 70:
        return encoded
    return "".join(encoded[i : i + 70] + "\n" for i in range(0, len(encoded), 70))


def _get_data(obj: Obj) -> dict[str, str]:
    if obj["kind"] == "ConfigMap":
        return dict(obj.get("data") or {})
    return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}


# --------------------------------------------------------------------------- patches


def _smp(target: Any, patch: Any, field: str = "") -> Any:
    if isinstance(target, dict) and isinstance(patch, dict):
        out = dict(target)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = _smp(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(target, list) and isinstance(patch, list):
        key = MERGE_KEYS.get(field)
        if key is None or not all(isinstance(i, dict) for i in [*target, *patch]):
            return copy.deepcopy(patch)
        # Like kustomize: the patch's items come first, in the patch's order (merged with
        # their originals), then the original items the patch does not name.
        first: list[Any] = []
        named = set()
        for item in patch:
            original = next((i for i in target if i.get(key) == item.get(key)), None)
            first.append(copy.deepcopy(item) if original is None else _smp(original, item, field))
            named.add(item.get(key))
        return first + [copy.deepcopy(i) for i in target if i.get(key) not in named]
    return copy.deepcopy(patch)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON patch path {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json6902(obj: Obj, ops: list[Obj]) -> Obj:
    obj = copy.deepcopy(obj)
    for op in ops:
        parts = _pointer(op["path"])
        parent: Any = obj
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        kind = op["op"]
        if kind not in ("add", "replace", "remove"):
            raise KustomizeError(f"JSON patch op {kind!r} is not supported")
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if kind == "add":
                parent.insert(index, copy.deepcopy(op["value"]))
            elif kind == "replace":
                parent[index] = copy.deepcopy(op["value"])
            else:
                del parent[index]
        else:
            if kind in ("replace", "remove") and last not in parent:
                raise KustomizeError(f"JSON patch {kind} of missing path {op['path']}")
            if kind == "remove":
                del parent[last]
            else:
                parent[last] = copy.deepcopy(op["value"])
    return obj


def _matches(obj: Obj, target: Obj) -> bool:
    unknown = set(target) - {"kind", "name", "namespace", "group", "version"}
    if unknown:
        raise KustomizeError(f"patch target fields {sorted(unknown)} are not supported")
    kind, namespace, name = _key(obj)
    if "kind" in target and target["kind"] != kind:
        return False
    if "name" in target and target["name"] != name:
        return False
    return not ("namespace" in target and target["namespace"] != namespace)


# --------------------------------------------------------------------------- transformers


def _pod_specs(obj: Obj) -> Iterator[Obj]:
    if obj.get("kind") in WORKLOADS:
        spec = obj.get("spec", {}).get("template", {}).get("spec")
        if isinstance(spec, dict):
            yield spec
    elif obj.get("kind") == "CronJob":
        job = obj.get("spec", {}).get("jobTemplate", {}).get("spec", {})
        spec = job.get("template", {}).get("spec")
        if isinstance(spec, dict):
            yield spec
    elif obj.get("kind") == "Pod" and isinstance(obj.get("spec"), dict):
        yield obj["spec"]


def _containers(obj: Obj) -> Iterator[Obj]:
    for spec in _pod_specs(obj):
        yield from spec.get("initContainers", [])
        yield from spec.get("containers", [])


def _split_image(image: str) -> tuple[str, str]:
    """(name, tag-or-digest suffix including its separator)."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def _apply_images(objs: list[Obj], images: list[Obj]) -> None:
    for rule in images:
        unknown = set(rule) - {"name", "newName", "newTag", "digest"}
        if unknown:
            raise KustomizeError(f"images: unsupported {sorted(unknown)}")
        for container in (c for o in objs for c in _containers(o)):
            name, suffix = _split_image(container.get("image", ""))
            if name != rule["name"]:
                continue
            new_name = rule.get("newName", name)
            if "digest" in rule:
                suffix = "@" + rule["digest"]
            elif "newTag" in rule:
                suffix = ":" + str(rule["newTag"])
            container["image"] = new_name + suffix


def _apply_labels(objs: list[Obj], rules: list[Obj]) -> None:
    for rule in rules:
        unknown = set(rule) - {"pairs", "includeSelectors", "includeTemplates"}
        if unknown or rule.get("includeSelectors"):
            raise KustomizeError("labels: only pairs (+ includeTemplates) without selectors")
        pairs = {k: str(v) for k, v in rule["pairs"].items()}
        for obj in objs:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
            if rule.get("includeTemplates") and obj.get("kind") in WORKLOADS:
                template = obj["spec"]["template"]
                template.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
                for claim in obj["spec"].get("volumeClaimTemplates", []):
                    claim.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)


def _rename_refs(objs: list[Obj], kind: str, old: str, new: str) -> None:
    for spec in (s for o in objs for s in _pod_specs(o)):
        for volume in spec.get("volumes", []):
            if kind == "ConfigMap" and volume.get("configMap", {}).get("name") == old:
                volume["configMap"]["name"] = new
            if kind == "Secret" and volume.get("secret", {}).get("secretName") == old:
                volume["secret"]["secretName"] = new
            for source in volume.get("projected", {}).get("sources", []):
                ref = source.get("configMap" if kind == "ConfigMap" else "secret")
                if ref and ref.get("name") == old:
                    ref["name"] = new
        for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
            ref_field = "configMapRef" if kind == "ConfigMap" else "secretRef"
            key_field = "configMapKeyRef" if kind == "ConfigMap" else "secretKeyRef"
            for env_from in container.get("envFrom", []):
                if env_from.get(ref_field, {}).get("name") == old:
                    env_from[ref_field]["name"] = new
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get(key_field)
                if ref and ref.get("name") == old:
                    ref["name"] = new


# --------------------------------------------------------------------------- the build


class _Build:
    """What one kustomization has accumulated; generators are remembered across levels."""

    def __init__(self, generated: dict[tuple[str, str], Obj] | None = None) -> None:
        self.objs: list[Obj] = []
        # (kind, name) of each generated object -> its generator options
        self.generated: dict[tuple[str, str], Obj] = {} if generated is None else generated

    def find(self, kind: str, name: str) -> Obj | None:
        for obj in self.objs:
            if obj["kind"] == kind and obj["metadata"]["name"] == name:
                return obj
        return None

    def add(self, obj: Obj, origin: Path) -> None:
        if "kind" not in obj or "metadata" not in obj or "name" not in obj["metadata"]:
            raise KustomizeError(f"{origin}: a resource without kind or metadata.name")
        if any(_key(o) == _key(obj) for o in self.objs):
            raise KustomizeError(f"{origin}: {'/'.join(_key(obj))} is defined twice")
        self.objs.append(obj)


def _run(directory: Path, build: _Build, *, component: bool) -> None:
    kfile = _kustomization_file(directory)
    docs = _load_yaml_docs(kfile)
    if len(docs) != 1:
        raise KustomizeError(f"{kfile}: must hold one document")
    k = docs[0]
    unknown = set(k) - SUPPORTED_FIELDS
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported fields {sorted(unknown)}")
    expected_kind = "Component" if component else "Kustomization"
    if k.get("kind", "Kustomization") != expected_kind:
        raise KustomizeError(f"{kfile}: kind must be {expected_kind}")

    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            # A nested kustomization transforms only what it accumulates itself.
            sub = _Build(build.generated)
            _run(path, sub, component=False)
            for obj in sub.objs:
                build.add(obj, path)
        elif path.is_file():
            for doc in _load_yaml_docs(path):
                build.add(doc, path)
        else:
            raise KustomizeError(f"{kfile}: resource {entry} does not exist")
    for entry in k.get("components", []):
        _run((directory / entry).resolve(), build, component=True)

    _generate(k, directory, build)

    if k.get("namespace"):
        for obj in build.objs:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = k["namespace"]
    _apply_labels(build.objs, k.get("labels", []))
    for obj in build.objs:
        if k.get("commonAnnotations"):
            obj["metadata"].setdefault("annotations", {}).update(k["commonAnnotations"])
    _apply_images(build.objs, k.get("images", []))
    for rule in k.get("replicas", []):
        hits = [
            o for o in build.objs if o["metadata"]["name"] == rule["name"] and o["kind"] in SCALABLE
        ]
        if not hits:
            raise KustomizeError(f"{kfile}: replicas for unknown {rule['name']}")
        for obj in hits:
            obj["spec"]["replicas"] = int(rule["count"])
    for entry in k.get("patches", []):
        _patch(entry, directory, build, kfile)


def _generate(k: Obj, directory: Path, build: _Build) -> None:
    defaults = k.get("generatorOptions", {})
    for field, kind in (("configMapGenerator", "ConfigMap"), ("secretGenerator", "Secret")):
        for gen in k.get(field, []):
            options = {**defaults, **gen.get("options", {})}
            data = _generator_data(gen, directory)
            behavior = gen.get("behavior", "create")
            key = (kind, gen["name"])
            if behavior == "create":
                if key in build.generated:
                    raise KustomizeError(f"{kind} {gen['name']} is generated twice")
                build.generated[key] = options
                obj = _generated_object(kind, gen["name"], data, options, gen.get("type", "Opaque"))
                build.add(obj, directory)
                continue
            existing = build.find(kind, gen["name"])
            if key not in build.generated or existing is None:
                raise KustomizeError(f"{kind} {gen['name']}: {behavior} of nothing")
            if behavior == "merge":
                _set_data(existing, {**_get_data(existing), **data})
            elif behavior == "replace":
                _set_data(existing, data)
            else:
                raise KustomizeError(f"{kind} {gen['name']}: behavior {behavior!r}")
            build.generated[key] = {**build.generated[key], **options}
            for field_name in ("labels", "annotations"):
                if options.get(field_name):
                    existing["metadata"].setdefault(field_name, {}).update(options[field_name])


def _patch(entry: Obj, directory: Path, build: _Build, kfile: Path) -> None:
    unknown = set(entry) - {"path", "patch", "target"}
    if unknown:
        raise KustomizeError(f"{kfile}: patch fields {sorted(unknown)} are not supported")
    text = _read_file(directory / entry["path"]) if "path" in entry else entry["patch"]
    body = yaml.safe_load(text)
    if isinstance(body, list):
        if "target" not in entry:
            raise KustomizeError(f"{kfile}: a JSON 6902 patch needs a target")
        hits = [i for i, o in enumerate(build.objs) if _matches(o, entry["target"])]
        if not hits:
            raise KustomizeError(f"{kfile}: patch target {entry['target']} matches nothing")
        for i in hits:
            build.objs[i] = _json6902(build.objs[i], body)
        return
    target = entry.get("target") or {
        "kind": body["kind"],
        "name": body["metadata"]["name"],
    }
    hits = [i for i, o in enumerate(build.objs) if _matches(o, target)]
    if not hits:
        raise KustomizeError(f"{kfile}: patch for {target} matches nothing")
    for i in hits:
        patch = {k: v for k, v in body.items() if k not in ("apiVersion", "kind")}
        patch["metadata"] = {
            k: v for k, v in (body.get("metadata") or {}).items() if k not in ("name",)
        }
        build.objs[i] = _smp(build.objs[i], patch)


def render(directory: Path | str) -> list[Obj]:
    """Render a kustomization directory to its list of objects."""
    build = _Build()
    _run(Path(directory).resolve(), build, component=False)
    for (kind, name), options in build.generated.items():
        if options.get("disableNameSuffixHash"):
            continue
        obj = build.find(kind, name)
        assert obj is not None
        new_name = f"{name}-{_name_hash(obj)}"
        obj["metadata"]["name"] = new_name
        _rename_refs(build.objs, kind, name, new_name)
    return sorted(build.objs, key=_apply_order)


# kustomize's legacy output order: what others depend on first (namespaces, config,
# Services before workloads), webhooks last; the rest by group, version and kind; then
# namespace and name.
_ORDER_FIRST = [
    "Namespace",
    "ResourceQuota",
    "StorageClass",
    "CustomResourceDefinition",
    "ServiceAccount",
    "PodSecurityPolicy",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
    "ConfigMap",
    "Secret",
    "Endpoints",
    "Service",
    "LimitRange",
    "PriorityClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Deployment",
    "StatefulSet",
    "CronJob",
    "PodDisruptionBudget",
]
_ORDER_LAST = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]


def _apply_order(obj: Obj) -> tuple[int, str, str, str]:
    kind, namespace, name = _key(obj)
    group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
    if kind in _ORDER_FIRST:
        rank = _ORDER_FIRST.index(kind)
    elif kind in _ORDER_LAST:
        rank = len(_ORDER_FIRST) + 1 + _ORDER_LAST.index(kind)
    else:
        rank = len(_ORDER_FIRST)
    return rank, f"{group}_{version}_{kind}", namespace, name


def dump(objs: list[Obj]) -> str:
    return yaml.safe_dump_all(objs, sort_keys=True, default_flow_style=False)


def _kubectl_render(directory: Path) -> list[Obj]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


_HASHED = re.compile(r"^(?P<name>.+)-[0-9a-z]{10}$")


def _without_hashes(objs: list[Obj]) -> list[Obj]:
    """The objects with generated names' hash suffixes removed (they differ by design)."""
    text = json.dumps(objs)
    for obj in objs:
        if obj.get("kind") in ("ConfigMap", "Secret"):
            match = _HASHED.match(obj["metadata"]["name"])
            if match:
                text = text.replace(f'"{match.group(0)}"', f'"{match.group("name")}"')
    result: list[Obj] = json.loads(text)
    return result


def compare_with_kubectl(directory: Path) -> list[str]:
    """Differences between this renderer and ``kubectl kustomize`` (the objects and their
    order), ignoring the generated names' hash suffixes."""
    ours_list = _without_hashes(render(directory))
    theirs_list = _without_hashes(_kubectl_render(directory))
    ours = {_key(o): o for o in ours_list}
    theirs = {_key(o): o for o in theirs_list}
    problems = [f"only kubectl renders {k}" for k in theirs.keys() - ours.keys()]
    if [_key(o) for o in ours_list] != [_key(o) for o in theirs_list]:
        problems.append("the objects come in another order")
    problems += [f"only we render {k}" for k in ours.keys() - theirs.keys()]
    for k in ours.keys() & theirs.keys():
        if ours[k] != theirs[k]:
            problems.append(f"{k} differs:\n{dump([ours[k]])}---- kubectl:\n{dump([theirs[k]])}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--compare", action="store_true", help="diff with kubectl kustomize")
    args = parser.parse_args()
    if args.compare:
        if not shutil.which("kubectl"):
            sys.exit("kubectl is not installed: nothing to compare with")
        problems = compare_with_kubectl(args.directory)
        for problem in problems:
            print(problem)
        print(f"{len(problems)} differences with kubectl kustomize")
        sys.exit(1 if problems else 0)
    sys.stdout.write(dump(render(args.directory)))


if __name__ == "__main__":
    main()
