"""Submit a DreamBooth training job to Kubernetes as a KubeRay RayJob or a plain
batch/v1 Job, then watch it: ``atelier kube submit`` is the command line.

The job spec (TrainingJobSpec fields as YAML, as for ``atelier-train run``)
travels in a ConfigMap ``atelier-job-<id>``; the workload comes from the
templates in ``deploy/k8s/templates`` (``${JOB_ID}``, ``${NAMESPACE}``,
``${IMAGE}``, ``${GPUS}``) and runs ``atelier-train run`` on it. The official
``kubernetes`` client creates both (CoreV1Api, BatchV1Api, CustomObjectsApi) and
polls the workload's status. Needs ``pip install 'atelier[k8s]'``.

    objects = render_job(spec_file, job_id="rex", namespace="atelier",
                         image="ghcr.io/atelier-dev/atelier:0.1.0-cuda", kind="rayjob")
    submit(objects)
    final = watch(objects[-1], on_status=print)        # JobStatus(phase="SUCCEEDED", ...)
"""

from __future__ import annotations

import base64
import re
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

#: Workload kinds and their templates.
TEMPLATES = {"rayjob": "rayjob.yaml", "job": "batch-job.yaml"}
#: A ConfigMap holds at most 1 MiB; leave room for its metadata.
MAX_SPEC_BYTES = 1000 * 1024
_JOB_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


def templates_dir() -> Path:
    """deploy/k8s/templates in a checkout, or the copy packaged beside this module."""
    packaged = Path(__file__).parent / "k8s_templates"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[4] / "deploy" / "k8s" / "templates"


def inline_image_files(spec: dict, base_dir: Path) -> dict:
    """Replace ``instance_images`` entries ``{file: path}`` (relative to ``base_dir``)
    by ``{data: base64}``, as the API's JSON form of bytes expects."""
    out = dict(spec)
    for key in ("instance_images", "instanceImages"):  # proto JSON takes either name
        if key not in spec:
            continue
        images = []
        for item in spec[key] or []:
            if isinstance(item, dict) and "file" in item:
                data = (base_dir / item["file"]).read_bytes()
                images.append({"data": base64.b64encode(data).decode()})
            else:
                images.append(item)
        out[key] = images
    return out


def load_spec(path: str | Path):
    """A TrainingJobSpec from YAML or JSON (photos as ``{file: path}`` entries): the
    one reader of spec files, for the standalone entry point, the CLI and sweeps."""
    from google.protobuf import json_format

    from atelier.v1 import training_pb2

    path = Path(path)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the spec must be a mapping of TrainingJobSpec fields")
    return json_format.ParseDict(inline_image_files(data, path.parent),
                                 training_pb2.TrainingJobSpec())


def render_job(spec_file: str | Path, *, job_id: str, namespace: str, image: str,
               kind: str = "rayjob", gpus: int = 1) -> list[dict]:
    """The objects to create: the spec ConfigMap, then the RayJob or Job."""
    if kind not in TEMPLATES:
        raise ValueError(f"kind must be one of {sorted(TEMPLATES)}")
    if not _JOB_ID.match(job_id):
        raise ValueError("job id: 1-40 lowercase letters, digits or '-', starting and "
                         "ending with a letter or digit")
    if gpus < 0:
        raise ValueError("gpus must be >= 0")
    path = Path(spec_file)
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: the spec must be a mapping of TrainingJobSpec fields")
    spec_text = yaml.safe_dump(inline_image_files(spec, path.parent), sort_keys=False)
    if len(spec_text.encode()) > MAX_SPEC_BYTES:
        raise ValueError("the spec is over 1 MiB with its photos inlined: put the photos "
                         "in the object store and list them as {object: {key: ...}}")
    config_map = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": f"atelier-job-{job_id}", "namespace": namespace,
                     "labels": {"app.kubernetes.io/part-of": "atelier",
                                "atelier.dev/training-job": job_id}},
        "data": {"spec.yaml": spec_text},
    }
    text = (templates_dir() / TEMPLATES[kind]).read_text()
    workload = yaml.safe_load(string.Template(text).substitute(
        JOB_ID=job_id, NAMESPACE=namespace, IMAGE=image, GPUS=str(gpus)))
    if gpus == 0:
        _drop_gpus(workload)
    return [config_map, workload]


def _drop_gpus(node: Any) -> None:
    """No GPU: remove nvidia.com/gpu requests, GPU node selectors and tolerations."""
    if isinstance(node, dict):
        for key in ("requests", "limits"):
            if isinstance(node.get(key), dict):
                node[key].pop("nvidia.com/gpu", None)
        if isinstance(node.get("nodeSelector"), dict):
            node["nodeSelector"].pop("nvidia.com/gpu.present", None)
            if not node["nodeSelector"]:
                del node["nodeSelector"]
        if isinstance(node.get("tolerations"), list):
            node["tolerations"] = [t for t in node["tolerations"]
                                   if t.get("key") != "nvidia.com/gpu"]
            if not node["tolerations"]:
                del node["tolerations"]
        for value in node.values():
            _drop_gpus(value)
    elif isinstance(node, list):
        for value in node:
            _drop_gpus(value)


def api_client(kubeconfig: str | None = None, context: str | None = None):
    """A kubernetes ApiClient: in-cluster config inside a pod, else the kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        return config.new_client_from_config(config_file=kubeconfig, context=context)


def submit(objects: list[dict], api=None) -> None:
    """Create the ConfigMap (replacing an older one) and the workload."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = api or api_client()
    config_map, workload = objects
    namespace = workload["metadata"]["namespace"]
    core = client.CoreV1Api(api)
    try:
        core.create_namespaced_config_map(namespace, config_map)
    except ApiException as exc:
        if exc.status != 409:
            raise
        core.replace_namespaced_config_map(config_map["metadata"]["name"], namespace,
                                           config_map)
    if workload["kind"] == "Job":
        client.BatchV1Api(api).create_namespaced_job(namespace, workload)
    else:
        group, version = workload["apiVersion"].split("/")
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            group, version, namespace, "rayjobs", workload)


@dataclass(frozen=True)
class JobStatus:
    """Where a submitted workload stands: ``phase`` is PENDING, RUNNING, SUCCEEDED or
    FAILED; ``detail`` is the controller's own words (RayJob status, Job conditions)."""

    phase: str
    detail: str = ""

    @property
    def done(self) -> bool:
        return self.phase in ("SUCCEEDED", "FAILED")


def job_status(workload: dict, api=None) -> JobStatus:
    """Read the workload's status once."""
    from kubernetes import client

    api = api or api_client()
    name, namespace = workload["metadata"]["name"], workload["metadata"]["namespace"]
    if workload["kind"] == "Job":
        job = client.BatchV1Api(api).read_namespaced_job_status(name, namespace)
        status = job.status or client.V1JobStatus()  # none yet: just created
        for condition in status.conditions or []:
            if condition.status == "True" and condition.type in ("Complete", "SuccessCriteriaMet"):
                return JobStatus("SUCCEEDED", condition.type)
            if condition.status == "True" and condition.type in ("Failed", "FailureTarget"):
                return JobStatus("FAILED", f"{condition.reason or ''} {condition.message or ''}"
                                 .strip())
        if status.active:
            return JobStatus("RUNNING", f"{status.active} pod(s) active")
        return JobStatus("PENDING")
    group, version = workload["apiVersion"].split("/")
    obj = client.CustomObjectsApi(api).get_namespaced_custom_object_status(
        group, version, namespace, "rayjobs", name)
    status = obj.get("status") or {}
    job_state = status.get("jobStatus", "")
    deployment = status.get("jobDeploymentStatus", "")
    detail = " ".join(x for x in (deployment, job_state, status.get("message", "")) if x)
    if job_state in ("FAILED", "STOPPED") or deployment in ("Failed", "ValidationFailed"):
        return JobStatus("FAILED", detail)
    if job_state == "SUCCEEDED" or deployment == "Complete":
        return JobStatus("SUCCEEDED", detail)
    if job_state == "RUNNING" or deployment == "Running":
        return JobStatus("RUNNING", detail)
    return JobStatus("PENDING", detail)


def watch(workload: dict, api=None, *, interval_s: float = 5.0, timeout_s: float | None = None,
          on_status: Callable[[JobStatus], None] | None = None) -> JobStatus:
    """Poll until the workload ends (or ``timeout_s`` passes); report each change."""
    api = api or api_client()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last = None
    while True:
        status = job_status(workload, api)
        if status != last and on_status:
            on_status(status)
        last = status
        if status.done or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(interval_s)
