"""Render a kustomization offline: the subset of kustomize that deploy/kubernetes uses, and nothing else.

CI validates the manifests that `kubectl apply -k` would send, but a fresh machine has no kustomize. This renders
the same output for the features the project's kustomizations use, and refuses any other feature loudly rather
than guess at it. tests/deploy/test_kustomize_render.py compares its output with `kubectl kustomize` wherever
kubectl is installed, so the two cannot drift apart unnoticed.

Supported kustomization fields:
  resources            files (multi-document YAML) and directories holding a kustomization
  configMapGenerator   `files` and `literals`, `options.labels`/`annotations`/`disableNameSuffixHash`; the name
                       gets kustomize's content hash, and references to it in pod specs follow
  patches              strategic-merge patches (inline `patch` or `path`), with an optional target by kind,
                       name and namespace
  images               `newName`, `newTag`, `digest`
  namespace            set on every namespaced resource

    python -m scripts.kustomize_render deploy/kubernetes/overlays/production > rendered.yaml
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "configMapGenerator", "patches", "images", "namespace"}
SUPPORTED_GENERATOR_FIELDS = {"name", "files", "literals", "options"}
SUPPORTED_GENERATOR_OPTIONS = {"labels", "annotations", "disableNameSuffixHash"}

# kustomize's "legacy" output order: these kinds first, in this order; these last; everything else between.
ORDER_FIRST = [
    "Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition", "ServiceAccount",
    "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "ConfigMap", "Secret",
    "Endpoints", "Service", "LimitRange", "PriorityClass", "PersistentVolume", "PersistentVolumeClaim",
    "Deployment", "StatefulSet", "CronJob", "PodDisruptionBudget",
]  # fmt: skip
ORDER_LAST = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
    "StorageClass", "PriorityClass", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
    "APIService", "IngressClass", "RuntimeClass", "CSIDriver", "CSINode", "Node", "PodSecurityPolicy",
}  # fmt: skip

# Strategic-merge keys of the list fields a patch may touch (from the Kubernetes API's patchMergeKey tags).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "envFrom": None,
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "topologySpreadConstraints": "topologyKey",
    "ports": None,  # containerPort in a container, port in a Service: decided per item
}
PATCH_DIRECTIVES = ("$patch", "$setElementOrder", "$retainKeys", "$deleteFromPrimitiveList")


class KustomizeError(Exception):
    """A kustomization this renderer cannot render exactly as kustomize would."""


@dataclass
class _Item:
    obj: Obj
    # Set on generated ConfigMaps whose name still needs the content hash: the name before the suffix.
    hash_pending: bool = False
    original_name: str = ""


@dataclass
class _Build:
    items: list[_Item] = field(default_factory=list)


def _load_kustomization(directory: Path) -> tuple[Obj, Path]:
    for name in KUSTOMIZATION_FILES:
        path = directory / name
        if path.is_file():
            data = yaml.safe_load(path.read_text()) or {}
            if not isinstance(data, dict):
                raise KustomizeError(f"{path}: not a mapping")
            return data, path
    raise KustomizeError(f"{directory}: no kustomization file")


def _inside(root: Path, path: Path) -> Path:
    # kustomize's default load restriction: a kustomization reads files only from its own directory tree.
    resolved = path.resolve()
    if resolved != root.resolve() and root.resolve() not in resolved.parents:
        raise KustomizeError(f"{path}: outside the kustomization root {root} (kustomize refuses it)")
    if not resolved.is_file():
        raise KustomizeError(f"{path}: no such file")
    return resolved


def _documents(path: Path) -> list[Obj]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "metadata" not in doc:
            raise KustomizeError(f"{path}: every document must be a resource with kind and metadata")
    return docs


def config_map_hash(config_map: Obj) -> str:
    """kustomize's name-suffix hash of a ConfigMap.

    The same as kustomize's hasher: sha256 of the JSON of kind, data (and binaryData when present) and name, the
    first 10 hex digits with 0, 1, 3, a, e swapped for g, h, k, m, t (no vowels, no look-alike digits). kustomize
    looks the name up by the path "metadata/name" as one key, finds nothing and hashes an empty name; so does this,
    which is why its result matches `kubectl kustomize` byte for byte.
    """
    encoded: Obj = {"data": config_map.get("data") or "", "kind": "ConfigMap", "name": ""}
    if isinstance(config_map.get("binaryData"), dict):
        encoded["binaryData"] = config_map["binaryData"]
    text = json.dumps(encoded, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # Go's encoding/json escapes these for safe embedding in HTML; the hash is over Go's bytes.
    go_escapes = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
    for char, escape in go_escapes.items():
        text = text.replace(char, escape)
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _generate_config_map(spec: Obj, root: Path) -> _Item:
    unknown = set(spec) - SUPPORTED_GENERATOR_FIELDS
    if unknown:
        raise KustomizeError(f"configMapGenerator fields not supported here: {', '.join(sorted(unknown))}")
    options = spec.get("options") or {}
    unknown = set(options) - SUPPORTED_GENERATOR_OPTIONS
    if unknown:
        raise KustomizeError(f"configMapGenerator options not supported here: {', '.join(sorted(unknown))}")
    data: dict[str, str] = {}
    for entry in spec.get("files") or []:
        key, _, rel = entry.partition("=") if "=" in entry else (Path(entry).name, "", entry)
        data[key] = _inside(root, root / rel).read_text()
    for entry in spec.get("literals") or []:
        key, sep, value = entry.partition("=")
        if not sep:
            raise KustomizeError(f"configMapGenerator literal without '=': {entry}")
        data[key] = value
    metadata: Obj = {"name": spec["name"]}
    if options.get("labels"):
        metadata["labels"] = dict(options["labels"])
    if options.get("annotations"):
        metadata["annotations"] = dict(options["annotations"])
    obj: Obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}
    return _Item(obj, hash_pending=not options.get("disableNameSuffixHash", False), original_name=spec["name"])


def _reject_directives(patch: Any, where: str) -> None:
    if isinstance(patch, dict):
        for key, value in patch.items():
            if key in PATCH_DIRECTIVES or (isinstance(key, str) and key.startswith("$setElementOrder/")):
                raise KustomizeError(f"{where}: patch directive {key} is not supported here")
            _reject_directives(value, where)
    elif isinstance(patch, list):
        for value in patch:
            _reject_directives(value, where)


def _item_key(item: Obj, list_name: str) -> tuple[str, Any] | None:
    key = MERGE_KEYS.get(list_name)
    if list_name == "ports":
        key = "containerPort" if "containerPort" in item else "port"
    if key is None or key not in item:
        return None
    return key, item[key]


def strategic_merge(target: Any, patch: Any, list_name: str = "") -> Any:
    """Merge ``patch`` into ``target`` the way a strategic-merge patch does, for maps and keyed lists."""
    if isinstance(target, dict) and isinstance(patch, dict):
        merged = dict(target)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    keyed = (
        isinstance(target, list)
        and isinstance(patch, list)
        and list_name in MERGE_KEYS
        and all(isinstance(p, dict) and _item_key(p, list_name) for p in patch)
        and all(isinstance(t, dict) for t in target)
    )
    if keyed:
        # kustomize's order: the patch's items first, in the patch's order (merged into their originals),
        # then the original items the patch does not name, in their original order.
        patched: list[Any] = []
        used: set[int] = set()
        for item in patch:
            ident = _item_key(item, list_name)
            for index, existing in enumerate(target):
                if index not in used and _item_key(existing, list_name) == ident:
                    patched.append(strategic_merge(existing, item, list_name))
                    used.add(index)
                    break
            else:
                patched.append(copy.deepcopy(item))
        return patched + [copy.deepcopy(t) for index, t in enumerate(target) if index not in used]
    return copy.deepcopy(patch)


def _matches(obj: Obj, target: Obj) -> bool:
    unknown = set(target) - {"kind", "name", "namespace"}
    if unknown:
        raise KustomizeError(f"patch target fields not supported here: {', '.join(sorted(unknown))}")
    meta = obj.get("metadata") or {}
    return (
        ("kind" not in target or obj.get("kind") == target["kind"])
        and ("name" not in target or meta.get("name") == target["name"])
        and ("namespace" not in target or meta.get("namespace") == target["namespace"])
    )


def _apply_patch(items: list[_Item], spec: Obj, root: Path) -> None:
    unknown = set(spec) - {"path", "patch", "target"}
    if unknown:
        raise KustomizeError(f"patch fields not supported here: {', '.join(sorted(unknown))}")
    text = _inside(root, root / spec["path"]).read_text() if "path" in spec else spec.get("patch", "")
    patch = yaml.safe_load(text)
    where = spec.get("path", "inline patch")
    if isinstance(patch, list):
        raise KustomizeError(f"{where}: JSON 6902 patches are not supported here; use a strategic-merge patch")
    if not isinstance(patch, dict):
        raise KustomizeError(f"{where}: a patch must be a mapping")
    _reject_directives(patch, where)
    target = spec.get("target")
    if target is None:
        target = {"kind": patch.get("kind"), "name": (patch.get("metadata") or {}).get("name")}
    hits = [item for item in items if _matches(item.obj, target)]
    if not hits:
        raise KustomizeError(f"{where}: no resource matches the patch target {target}")
    for item in hits:
        identity = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind", "metadata")}
        meta_patch = {k: v for k, v in (patch.get("metadata") or {}).items() if k not in ("name", "namespace")}
        item.obj = strategic_merge(item.obj, identity)
        if meta_patch:
            item.obj["metadata"] = strategic_merge(item.obj["metadata"], meta_patch)


def _walk_containers(node: Any) -> Iterator[Obj]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            else:
                yield from _walk_containers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_containers(value)


def _split_image(image: str) -> tuple[str, str, str]:
    name, digest = image.split("@", 1) if "@" in image else (image, "")
    tag = ""
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    return name, tag, digest


def _apply_images(items: list[_Item], images: list[Obj]) -> None:
    for spec in images:
        unknown = set(spec) - {"name", "newName", "newTag", "digest"}
        if unknown:
            raise KustomizeError(f"images fields not supported here: {', '.join(sorted(unknown))}")
        for item in items:
            for container in _walk_containers(item.obj):
                name, tag, digest = _split_image(str(container.get("image", "")))
                if name != spec["name"]:
                    continue
                name = spec.get("newName", name)
                if "digest" in spec:
                    container["image"] = f"{name}@{spec['digest']}"
                elif "newTag" in spec:
                    container["image"] = f"{name}:{spec['newTag']}"
                else:
                    container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _rename_config_map_refs(node: Any, old: str, new: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("configMap", "configMapKeyRef", "configMapRef") and isinstance(value, dict):
                if value.get("name") == old:
                    value["name"] = new
            else:
                _rename_config_map_refs(value, old, new)
    elif isinstance(node, list):
        for value in node:
            _rename_config_map_refs(value, old, new)


def _build(directory: Path) -> _Build:
    kustomization, path = _load_kustomization(directory)
    unknown = set(kustomization) - SUPPORTED_FIELDS
    if unknown:
        raise KustomizeError(f"{path}: fields not supported here: {', '.join(sorted(unknown))}")
    build = _Build()
    for entry in kustomization.get("resources") or []:
        target = directory / entry
        if target.is_dir():
            # A base may live anywhere (kustomize allows ../base); its own files stay inside its own root.
            build.items.extend(_build(target).items)
        else:
            build.items.extend(_Item(doc) for doc in _documents(_inside(directory, target)))
    for spec in kustomization.get("configMapGenerator") or []:
        build.items.append(_generate_config_map(spec, directory))
    for spec in kustomization.get("patches") or []:
        _apply_patch(build.items, spec, directory)
    _apply_images(build.items, kustomization.get("images") or [])
    namespace = kustomization.get("namespace")
    if namespace:
        for item in build.items:
            if item.obj.get("kind") not in CLUSTER_SCOPED:
                item.obj.setdefault("metadata", {})["namespace"] = namespace
    return build


def _order(obj: Obj) -> tuple[int, str, str, str]:
    kind = str(obj.get("kind"))
    if kind in ORDER_FIRST:
        rank = ORDER_FIRST.index(kind)
    elif kind in ORDER_LAST:
        rank = len(ORDER_FIRST) + 1 + ORDER_LAST.index(kind)
    else:
        rank = len(ORDER_FIRST)
    meta = obj.get("metadata") or {}
    return rank, f"{obj.get('apiVersion')}/{kind}", str(meta.get("namespace", "")), str(meta.get("name", ""))


def render(directory: Path) -> list[Obj]:
    """The resources `kubectl kustomize DIRECTORY` would print, in kustomize's legacy order.

    Raises KustomizeError for any kustomization feature outside the supported subset.
    """
    build = _build(directory)
    for item in build.items:
        if item.hash_pending:
            new_name = f"{item.original_name}-{config_map_hash(item.obj)}"
            item.obj["metadata"]["name"] = new_name
            for other in build.items:
                _rename_config_map_refs(other.obj, item.original_name, new_name)
    seen: set[tuple[str, str, str]] = set()
    for item in build.items:
        meta = item.obj.get("metadata") or {}
        ident = (str(item.obj.get("kind")), str(meta.get("namespace", "")), str(meta.get("name", "")))
        if ident in seen:
            raise KustomizeError(f"resource defined twice: {'/'.join(ident)}")
        seen.add(ident)
    return sorted((item.obj for item in build.items), key=_order)


class _Dumper(yaml.SafeDumper):
    pass


def _str_presenter(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_presenter)


def dump(objs: list[Obj]) -> str:
    return "---\n".join(yaml.dump(obj, Dumper=_Dumper, sort_keys=True, width=1_000_000) for obj in objs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.kustomize_render", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(dump(render(args.directory)))
    except KustomizeError as exc:
        print(f"kustomize_render: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
