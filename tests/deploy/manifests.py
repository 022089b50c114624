"""Render deploy/k8s with kustomize and validate every object: core kinds against
the Kubernetes OpenAPI schemas (kubernetes-validate, strict), custom resources
against the CRD schemas in deploy/k8s/crds, and the pod templates inside Ray
resources against core/v1 PodTemplateSpec."""

from __future__ import annotations

import copy
import shutil
import subprocess
from functools import cache
from pathlib import Path

import jsonschema
import yaml

from tests.conftest import REPO_ROOT

K8S = REPO_ROOT / "deploy" / "k8s"
#: The Kubernetes version the manifests target (gRPC probes, preStop sleep).
KUBERNETES_VERSION = "1.32"
CRD_KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
             "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml"}


def kustomize_command() -> list[str]:
    """`kubectl kustomize` (kubectl 1.27+ bundles kustomize v5), or a standalone
    `kustomize build`."""
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    raise AssertionError("the deploy/k8s checks need kubectl 1.27+ (or kustomize v5) on PATH")


@cache
def render(overlay: str) -> tuple[dict, ...]:
    result = subprocess.run([*kustomize_command(), str(K8S / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def _json_schema(node):
    """An openAPIV3Schema as a JSON Schema: int-or-string and preserved fields."""
    if isinstance(node, dict):
        node = {k: _json_schema(v) for k, v in node.items()}
        if node.pop("x-kubernetes-int-or-string", False):
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        node.pop("x-kubernetes-preserve-unknown-fields", None)
        node.pop("format", None)
        return node
    if isinstance(node, list):
        return [_json_schema(v) for v in node]
    return node


@cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((K8S / "crds" / CRD_KINDS[kind]).read_text())
    schema = _json_schema(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def pod_templates(obj: dict) -> list[dict]:
    """The core/v1 PodTemplateSpecs nested in a Ray resource."""
    spec = obj.get("spec", {})
    cluster = spec.get("rayClusterSpec", spec) if obj["kind"] == "RayJob" else spec
    found = []
    if "headGroupSpec" in cluster:
        found.append(cluster["headGroupSpec"]["template"])
    found += [group["template"] for group in cluster.get("workerGroupSpecs", [])]
    if "submitterPodTemplate" in spec:
        found.append(spec["submitterPodTemplate"])
    return found


def validate(obj: dict) -> None:
    """Raise if ``obj`` does not match its schema."""
    import kubernetes_validate

    kind = obj["kind"]
    if kind in CRD_KINDS:
        errors = sorted(crd_validator(kind).iter_errors(obj), key=str)
        if errors:
            raise jsonschema.ValidationError(
                f"{kind} {obj['metadata']['name']}: " + "; ".join(
                    f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors))
        for template in pod_templates(obj):
            kubernetes_validate.validate(
                {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                 "template": copy.deepcopy(template)}, KUBERNETES_VERSION, strict=True)
        return
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def by_kind(objects, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def config_files(path: Path = K8S) -> list[Path]:
    return sorted(path.rglob("*.yaml"))
