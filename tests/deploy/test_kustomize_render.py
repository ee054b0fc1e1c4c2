"""The offline kustomize renderer renders what `kubectl kustomize` renders, and refuses what it cannot render."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from scripts.kustomize_render import KustomizeError, config_map_hash, dump, render, strategic_merge
from scripts.validate_deploy import KUSTOMIZATIONS, kustomizations

KUBECTL = shutil.which("kubectl")


def kubectl_kustomize(directory: Path) -> list[dict[str, object]]:
    assert KUBECTL is not None
    out = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc is not None]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_every_kustomization_is_found() -> None:
    names = {str(p.relative_to(KUSTOMIZATIONS)) for p in kustomizations()}
    assert names == {"base", "monitoring", "overlays/production"}


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed: nothing to compare the renderer with")
@pytest.mark.parametrize("directory", kustomizations(), ids=lambda p: str(p.relative_to(KUSTOMIZATIONS)))
def test_project_kustomizations_render_exactly_as_kubectl_does(directory: Path) -> None:
    # Same documents, same order, same content: hashes of generated names, patch merge order, images, namespace.
    assert render(directory) == kubectl_kustomize(directory)


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed: nothing to compare the renderer with")
def test_features_render_exactly_as_kubectl_does(tmp_path: Path) -> None:
    base = tmp_path / "base"
    write(base / "app.toml", 'name = "<x> & y"\nport = 8080\n')
    write(
        base / "deploy.yaml",
        """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, labels: {app: web}}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
        - name: web
          image: web:1.0
          env: [{name: A, value: "0"}, {name: B, value: "0"}]
          envFrom: [{configMapRef: {name: settings}}]
        - name: sidecar
          image: proxy@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
      volumes: [{name: cfg, configMap: {name: app-config}}, {name: scratch, emptyDir: {}}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
""",
    )
    write(
        base / "kustomization.yaml",
        """
resources: [deploy.yaml]
configMapGenerator:
  - name: app-config
    files: [app.toml]
    options: {labels: {team: edge}}
  - name: settings
    literals: [MODE=fast, LEVEL=3]
""",
    )
    overlay = tmp_path / "overlay"
    write(
        overlay / "kustomization.yaml",
        """
namespace: prod
resources: [../base, ns.yaml]
images:
  - {name: web, newName: registry.example.com/web, newTag: "2.0"}
patches:
  - path: patch.yaml
  - target: {kind: Service, name: web}
    patch: |
      apiVersion: v1
      kind: Service
      metadata: {name: web, annotations: {note: patched}}
      spec:
        ports: [{name: http, port: 8080, targetPort: 8080}]
""",
    )
    write(overlay / "ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod}\n")
    write(
        overlay / "patch.yaml",
        """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  template:
    spec:
      containers:
        - name: web
          env: [{name: NEW, value: "1"}, {name: B, value: "1"}]
          resources: {limits: {cpu: "2"}}
      volumes: [{name: scratch, emptyDir: {medium: Memory}}]
""",
    )
    assert render(overlay) == kubectl_kustomize(overlay)
    assert yaml.safe_load_all(dump(render(overlay)))  # the printed form parses back


def test_config_map_hash_matches_kustomize() -> None:
    # Names printed by `kubectl kustomize` (kustomize v5.5) for these generators.
    literal = {"kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"a": "b"}}
    assert config_map_hash(literal) == "4h2mbtbbt6"
    from_file = {"kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"gateway.toml": "[server]\nport = 8080\n"}}
    assert config_map_hash(from_file) == "mthd67t625"


def test_strategic_merge_puts_patched_items_first() -> None:
    target = {"env": [{"name": "A", "value": "0"}, {"name": "B", "value": "0"}, {"name": "C", "value": "0"}]}
    patch = {"env": [{"name": "NEW", "value": "1"}, {"name": "C", "value": "1"}]}
    assert strategic_merge(target, patch) == {
        "env": [
            {"name": "NEW", "value": "1"},
            {"name": "C", "value": "1"},
            {"name": "A", "value": "0"},
            {"name": "B", "value": "0"},
        ]
    }
    # A list without a merge key is replaced, and null deletes a key.
    assert strategic_merge({"args": ["a", "b"], "x": 1}, {"args": ["c"], "x": None}) == {"args": ["c"]}


@pytest.mark.parametrize(
    ("kustomization", "message"),
    [
        ("resources: [cm.yaml]\ncommonLabels: {a: b}\n", "fields not supported here: commonLabels"),
        ("resources: [../outside.yaml]\n", "outside the kustomization root"),
        (
            "resources: [cm.yaml]\npatches:\n  - target: {kind: ConfigMap}\n    patch: '[{op: remove, path: /data}]'\n",
            "JSON 6902 patches are not supported",
        ),
        (
            "resources: [cm.yaml]\npatches:\n  - patch: |\n      kind: ConfigMap\n      metadata: {name: cm}\n"
            "      $patch: delete\n",
            "patch directive $patch",
        ),
        (
            "resources: [cm.yaml]\npatches:\n  - target: {kind: Secret}\n    patch: 'kind: Secret'\n",
            "no resource matches",
        ),
        ("resources: [cm.yaml, cm.yaml]\n", "defined twice"),
    ],
)
def test_unsupported_features_are_refused(tmp_path: Path, kustomization: str, message: str) -> None:
    write(tmp_path / "outside.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: out}\n")
    root = tmp_path / "k"
    write(root / "cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\ndata: {a: b}\n")
    write(root / "kustomization.yaml", kustomization)
    with pytest.raises(KustomizeError, match=message.replace("$", r"\$")):
        render(root)
