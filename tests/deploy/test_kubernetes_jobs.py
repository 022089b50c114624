"""`atelier kube submit`: the objects it renders validate like the rest of deploy/k8s,
and submitted through the official kubernetes client to a stand-in API server
(tests/deploy/fake_kube_api.py, whose kubelet runs the workload's command here)
both workload kinds train a model that lands in the store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from atelier import kubernetes_jobs
from atelier.dev.demo_assets import toy_photo
from atelier.storage import open_store
from atelier.training.jobs import JobStore
from atelier.v1 import training_pb2 as T
from tests.deploy.fake_kube_api import FakeKubernetes, pod_environment
from tests.deploy.manifests import validate

IMAGE = "ghcr.io/atelier-dev/atelier:0.1.0-cpu"


@pytest.fixture
def spec_file(tmp_path):
    for pose in range(3):
        (tmp_path / f"pose-{pose}.png").write_bytes(toy_photo(pose))
    spec = {"identifier_token": "sks", "instance_prompt": "a photo of sks toy",
            "class_prompt": "a photo of a toy", "instance_images": [
                {"file": f"pose-{pose}.png"} for pose in range(3)],
            "prior_preservation": {"enabled": False}, "method": "FINE_TUNE_METHOD_LORA",
            "resolution": 64, "max_train_steps": 2, "seed": 5,
            "resources": {"num_workers": 1}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("kind", ["rayjob", "job"])
@pytest.mark.parametrize("gpus", [0, 1])
def test_rendered_objects_validate(spec_file, kind, gpus):
    config_map, workload = kubernetes_jobs.render_job(
        spec_file, job_id="rex-1", namespace="team-a", image=IMAGE, kind=kind, gpus=gpus)
    validate(config_map)
    validate(workload)
    assert workload["metadata"] == {**workload["metadata"], "name": "atelier-train-rex-1",
                                    "namespace": "team-a"}
    spec = yaml.safe_load(config_map["data"]["spec.yaml"])
    assert len(spec["instance_images"]) == 3 and "data" in spec["instance_images"][0]
    assert ("nvidia.com/gpu" in yaml.safe_dump(workload)) == bool(gpus)
    text = yaml.safe_dump(workload)
    assert "${" not in text and IMAGE in text and "atelier-job-rex-1" in text


def test_bad_input_is_refused(spec_file, tmp_path):
    with pytest.raises(ValueError, match="job id"):
        kubernetes_jobs.render_job(spec_file, job_id="Rex_1", namespace="a", image=IMAGE)
    with pytest.raises(ValueError, match="kind"):
        kubernetes_jobs.render_job(spec_file, job_id="rex", namespace="a", image=IMAGE,
                                   kind="pod")
    big = tmp_path / "big.yaml"
    (tmp_path / "big.png").write_bytes(b"\0" * 2_000_000)
    big.write_text(yaml.safe_dump({"instance_images": [{"file": "big.png"}]}))
    with pytest.raises(ValueError, match="object store"):
        kubernetes_jobs.render_job(big, job_id="rex", namespace="a", image=IMAGE)


def test_cli_dry_run_prints_the_objects(spec_file):
    cli = Path(sys.executable).parent / "atelier"
    result = subprocess.run([str(cli), "kube", "submit", str(spec_file), "--job-id", "rex",
                             "--image", IMAGE, "--kind", "job", "--gpus", "0", "--dry-run"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(result.stdout)]
    assert kinds == ["ConfigMap", "Job"]


def _job_in_store(store: Path, job_id: str):
    from atelier.kit.settings import StorageSettings

    return JobStore(open_store(StorageSettings(backend="local", local_root=store))).load(job_id)


def test_submit_and_watch_a_rayjob(spec_file, tmp_path, model_cache, tiny_sd):
    kind = "rayjob"
    from kubernetes import client

    store = tmp_path / "store"
    fake = FakeKubernetes(pod_environment(store, model_cache)).start()
    try:
        api = client.ApiClient(client.Configuration(host=fake.url))
        objects = kubernetes_jobs.render_job(spec_file, job_id=f"k8s-{kind}",
                                             namespace="atelier", image=IMAGE, kind=kind,
                                             gpus=0)
        kubernetes_jobs.submit(objects, api)
        seen = []
        final = kubernetes_jobs.watch(objects[-1], api, interval_s=0.5, timeout_s=600,
                                      on_status=seen.append)
        logs = fake.logs.get(f"atelier-train-k8s-{kind}", "")
        assert final.phase == "SUCCEEDED", logs[-3000:]
        assert seen[0].phase in ("PENDING", "RUNNING") and seen[-1] == final
        # Resubmitting the same id updates the ConfigMap; the workload already exists.
        with pytest.raises(client.exceptions.ApiException) as exists:
            kubernetes_jobs.submit(objects, api)
        assert exists.value.status == 409
    finally:
        fake.stop()
    job = _job_in_store(store, f"k8s-{kind}")
    assert job.state == T.TRAINING_JOB_STATE_SUCCEEDED and job.model == f"models/k8s-{kind}"


@pytest.mark.parametrize("kind", ["rayjob", "job"])
def test_a_workload_without_a_status_yet_is_pending(spec_file, kind):
    """Read between its creation and the controller's first status write."""
    from kubernetes import client

    fake = FakeKubernetes({}).start()
    try:
        objects = kubernetes_jobs.render_job(spec_file, job_id="fresh", namespace="atelier",
                                             image=IMAGE, kind=kind, gpus=0)
        workload = objects[-1]
        plural = "jobs" if kind == "job" else "rayjobs"
        fake.objects[(plural, "atelier", workload["metadata"]["name"])] = workload
        api = client.ApiClient(client.Configuration(host=fake.url))
        assert kubernetes_jobs.job_status(workload, api).phase == "PENDING"
    finally:
        fake.stop()


def test_cli_submits_a_batch_job_and_watches_it(spec_file, tmp_path, model_cache, tiny_sd):
    store = tmp_path / "store"
    fake = FakeKubernetes(pod_environment(store, model_cache)).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
        "users": [{"name": "tester", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester"}}]}))
    cli = Path(sys.executable).parent / "atelier"
    try:
        result = subprocess.run(
            [str(cli), "--json", "kube", "submit", str(spec_file), "--job-id", "k8s-cli",
             "--image", IMAGE, "--kind", "job", "--gpus", "0", "--kubeconfig", str(kubeconfig),
             "--poll-interval", "0.5"], capture_output=True, text=True, timeout=900)
    finally:
        fake.stop()
    assert result.returncode == 0, result.stdout + result.stderr + fake.logs.get(
        "atelier-train-k8s-cli", "")[-3000:]
    lines = [yaml.safe_load(line) for line in result.stdout.splitlines()]
    assert lines[0] == {"created": "Job/atelier-train-k8s-cli", "namespace": "atelier"}
    assert lines[-1]["phase"] == "SUCCEEDED"
    assert _job_in_store(store, "k8s-cli").state == T.TRAINING_JOB_STATE_SUCCEEDED
