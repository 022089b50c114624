"""deploy/k8s: each overlay renders with kustomize, every object validates against
its schema, and the objects say what the services need (probes, security,
resources, GPUs, config that the services accept, secrets kept out of ConfigMaps)."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml

from atelier.kit.settings import load_settings
from tests.deploy.manifests import by_kind, render, validate

OVERLAYS = ("cpu-dev", "gpu")
#: The overlays serving Qwen3-VL-235B-A22B-Instruct (on top of gpu).
LARGE = ("qwen3-vl-235b", "qwen3-vl-235b-multinode")
ALL_OVERLAYS = OVERLAYS + LARGE
SERVICES = {"training": ("atelier.v1.TrainingService", 50051, 9091),
            "generation": ("atelier.v1.GenerationService", 50052, 9092),
            "analysis": ("atelier.v1.AnalysisService", 50053, 9093)}
EXPECTED = {
    "Namespace": {"atelier"}, "ServiceAccount": {"atelier"},
    "StatefulSet": {"atelier-minio"}, "Job": {"atelier-minio-bucket-init"},
    "Deployment": {"atelier-training", "atelier-generation", "atelier-analysis",
                   "atelier-gateway"},
    "Service": {"atelier-minio", "atelier-training", "atelier-generation", "atelier-analysis",
                "atelier-gateway",
                "atelier-training-headless", "atelier-generation-headless",
                "atelier-analysis-headless"},
    "HorizontalPodAutoscaler": {"atelier-generation", "atelier-analysis"},
    "PodDisruptionBudget": {"atelier-generation", "atelier-analysis"},
    "NetworkPolicy": {"atelier-minio", "atelier-training", "atelier-generation",
                      "atelier-analysis", "atelier-gateway", "atelier-ray"},
    "RayCluster": {"atelier-ray"},
    "ServiceMonitor": {"atelier-training", "atelier-generation", "atelier-analysis",
                       "atelier-gateway"},
    "PrometheusRule": {"atelier"},
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_objects(overlay):
    objects = render(overlay)
    kinds = {}
    for obj in objects:
        kinds.setdefault(obj["kind"], set()).add(obj["metadata"]["name"])
    for kind, names in EXPECTED.items():
        assert kinds.pop(kind) == names, kind
    # Generated config and secret names carry a content hash.
    assert {n.rsplit("-", 1)[0] for n in kinds.pop("ConfigMap")} == {
        "atelier-common", "atelier-training-config", "atelier-generation-config",
        "atelier-analysis-config", "atelier-dashboards"}
    assert {n.rsplit("-", 1)[0] for n in kinds.pop("Secret")} == {"atelier-minio"}
    assert not kinds, f"unexpected kinds: {kinds}"
    assert all(o["metadata"].get("namespace") == "atelier" for o in objects
               if o["kind"] != "Namespace")


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_every_object_validates_against_its_schema(overlay):
    for obj in render(overlay):
        validate(obj)


def test_validation_catches_mistakes():
    objects = render("cpu-dev")
    deployment = copy.deepcopy(by_kind(objects, "Deployment")["atelier-generation"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(Exception, match="readinessProbes"):
        validate(deployment)
    cluster = copy.deepcopy(by_kind(objects, "RayCluster")["atelier-ray"])
    cluster["spec"]["workerGroupSpecs"][0]["replica"] = 2
    with pytest.raises(jsonschema.ValidationError, match="replica"):
        validate(cluster)
    cluster = copy.deepcopy(by_kind(objects, "RayCluster")["atelier-ray"])
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    with pytest.raises(Exception, match="imagePullPolicy"):
        validate(cluster)
    rule = copy.deepcopy(by_kind(objects, "PrometheusRule")["atelier"])
    rule["spec"]["groups"][0]["rules"][0]["for"] = "ten minutes"
    with pytest.raises(jsonschema.ValidationError):
        validate(rule)


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_services_are_probed_secured_and_drained(overlay):
    deployments = by_kind(render(overlay), "Deployment")
    for name, (proto, port, metrics_port) in SERVICES.items():
        pod = deployments[f"atelier-{name}"]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": port, "service": proto}, probe
        assert {p["containerPort"] for p in container["ports"]} == {port, metrics_port}
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert {"limits", "requests"} <= set(container["resources"])
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/var/cache/atelier", "/tmp", "/etc/atelier"} <= mounts
        env = {e["name"]: e for e in container["env"]}
        drain = float(env["ATELIER_GRPC__SHUTDOWN_GRACE_S"]["value"])
        pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["terminationGracePeriodSeconds"] > drain + pause
        # Store credentials come from the Secret, never from a ConfigMap.
        for key in ("ATELIER_STORAGE__ACCESS_KEY", "ATELIER_STORAGE__SECRET_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"]["name"].startswith("atelier-minio")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_is_probed_secured_and_calls_the_services(overlay):
    from atelier.gateway.config import GatewaySettings

    pod = by_kind(render(overlay), "Deployment")["atelier-gateway"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["atelier-gateway"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e["value"] for e in container["env"]}
    settings = GatewaySettings(gateway={k.removeprefix("ATELIER_GATEWAY__").lower(): v
                                        for k, v in env.items()})
    assert settings.gateway.port == container["ports"][0]["containerPort"]
    assert settings.gateway.generation_target.endswith("atelier-generation-headless:50052")


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_config_maps_hold_settings_the_services_accept(overlay, tmp_path):
    import importlib

    objects = render(overlay)
    config_maps = {n.rsplit("-", 1)[0]: o for n, o in by_kind(objects, "ConfigMap").items()}
    for name in SERVICES:
        app = importlib.import_module(f"atelier.{name}.app")
        path = tmp_path / f"{name}.yaml"
        path.write_text(config_maps[f"atelier-{name}-config"]["data"]["atelier.yaml"])
        settings = load_settings(app.Settings, path)
        assert settings.grpc.port == SERVICES[name][1]
    common = config_maps["atelier-common"]["data"]
    assert common["ATELIER_STORAGE__BACKEND"] == "minio"
    for config_map in config_maps.values():
        for key, value in config_map["data"].items():
            assert "PASSWORD" not in key and "SECRET" not in key and "ACCESS_KEY" not in key
            assert "change-me" not in value
    secret = next(iter(by_kind(objects, "Secret").values()))
    assert {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"} <= set(secret["data"])
    dashboards = config_maps["atelier-dashboards"]
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert len(dashboards["data"]) == 4


def test_gpu_overlay_requests_gpus_on_gpu_nodes():
    objects = render("gpu")
    deployments = by_kind(objects, "Deployment")
    for name in ("generation", "analysis"):
        spec = deployments[f"atelier-{name}"]["spec"]
        pod = spec["template"]["spec"]
        assert spec["replicas"] == 2
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    workers = by_kind(objects, "RayCluster")["atelier-ray"]["spec"]["workerGroupSpecs"][0]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] == 1
    config_maps = {n.rsplit("-", 1)[0]: o for n, o in by_kind(objects, "ConfigMap").items()}
    generation = yaml.safe_load(config_maps["atelier-generation-config"]["data"]["atelier.yaml"])
    assert "tiny://" not in str(generation) and generation["generation"]["device"] == "cuda"
    assert by_kind(objects, "HorizontalPodAutoscaler")["atelier-generation"]["spec"][
        "minReplicas"] == 2


def test_cpu_dev_overlay_is_one_replica_without_gpus():
    objects = render("cpu-dev")
    assert "nvidia.com/gpu" not in yaml.safe_dump(list(objects))
    for hpa in by_kind(objects, "HorizontalPodAutoscaler").values():
        assert hpa["spec"]["minReplicas"] == hpa["spec"]["maxReplicas"] == 1
    for deployment in by_kind(objects, "Deployment").values():
        assert deployment["spec"]["replicas"] == 1
    config_maps = {n.rsplit("-", 1)[0]: o for n, o in by_kind(objects, "ConfigMap").items()}
    assert "tiny://" in config_maps["atelier-generation-config"]["data"]["atelier.yaml"]


def test_network_policies_fence_minio_and_the_services():
    policies = by_kind(render("cpu-dev"), "NetworkPolicy")
    minio = policies["atelier-minio"]["spec"]["ingress"]
    assert minio == [{"from": [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/part-of": "atelier"}}}], "ports": [{"port": 9000,
                                                              "protocol": "TCP"}]}]
    for name in ("generation", "analysis"):
        rules = policies[f"atelier-{name}"]["spec"]["ingress"]
        assert [r["ports"][0]["port"] for r in rules] == list(SERVICES[name][1:])
        assert rules[1]["from"] == [{"namespaceSelector": {"matchLabels": {
            "atelier.dev/monitoring": "true"}}}]
    training = by_kind(render("cpu-dev"), "Deployment")["atelier-training"]
    env = {e["name"]: e.get("value") for e in
           training["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RAY_ADDRESS"] == "ray://atelier-ray-head-svc:10001"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_has_a_headless_service_and_rebalancing_connections(overlay):
    """Clients spread over pods only if DNS names every pod (a headless Service) and
    connections are recycled after a scale-out (max_connection_age)."""
    import yaml

    objects = render(overlay)
    services = by_kind(objects, "Service")
    configs = {o["metadata"]["name"].rsplit("-", 1)[0]: o for o in objects
               if o["kind"] == "ConfigMap"}
    for name, (_, port, _) in SERVICES.items():
        headless = services[f"atelier-{name}-headless"]["spec"]
        assert headless["clusterIP"] == "None"
        assert headless["selector"] == services[f"atelier-{name}"]["spec"]["selector"]
        assert [p["port"] for p in headless["ports"]] == [port]
        settings = yaml.safe_load(configs[f"atelier-{name}-config"]["data"]["atelier.yaml"])
        if name != "training":  # scaled by their HPAs
            assert settings["grpc"]["max_connection_age_s"] > 0
            assert settings["grpc"]["max_connection_age_grace_s"] >= 600


def _analysis_settings(overlay: str, tmp_path):
    from atelier.analysis.app import Settings

    config_maps = {n.rsplit("-", 1)[0]: o for n, o in by_kind(render(overlay),
                                                              "ConfigMap").items()}
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(config_maps["atelier-analysis-config"]["data"]["atelier.yaml"])
    return load_settings(Settings, path).analysis


@pytest.mark.parametrize("overlay", ("gpu", *LARGE))
def test_vllm_engine_arguments_build_from_every_vllm_config(overlay, tmp_path):
    """vLLM's own AsyncEngineArgs, built from each GPU sample config without starting
    an engine (names and types are vLLM's)."""
    from atelier.analysis.vllm_settings import engine_args

    config = _analysis_settings(overlay, tmp_path)
    assert config.backend == "vllm" and config.device == "cuda"
    args = engine_args(config, config.model, "cuda", config.dtype)
    assert args.model == config.model and args.dtype == "bfloat16"
    assert args.limit_mm_per_prompt == {"image": config.max_images, "video": 1}
    assert args.mm_processor_kwargs["images_kwargs"]["size"]["longest_edge"] == \
        config.image_max_pixels
    assert args.enable_prefix_caching and args.kv_cache_memory_bytes is None
    if overlay in LARGE:
        assert config.model == "Qwen/Qwen3-VL-235B-A22B-Instruct"
        assert args.tensor_parallel_size == 8 and args.enable_expert_parallel
    if overlay == "qwen3-vl-235b":
        assert args.pipeline_parallel_size == 1 and args.distributed_executor_backend == "mp"
    if overlay == "qwen3-vl-235b-multinode":
        assert args.pipeline_parallel_size == 2 and args.distributed_executor_backend == "ray"


def test_vllm_settings_mistakes_are_clear_errors():
    from pydantic import ValidationError

    from atelier.analysis.config import AnalysisEngineSettings
    from atelier.analysis.vllm_settings import engine_args

    with pytest.raises(ValidationError, match="tensor_paralel_size"):
        AnalysisEngineSettings(backend="vllm", vllm={"tensor_paralel_size": 8})
    with pytest.raises(ValidationError, match="gpu_memory_utilization"):
        AnalysisEngineSettings(backend="vllm", vllm={"gpu_memory_utilization": 1.5})
    bad_name = AnalysisEngineSettings(backend="vllm", vllm={"extra": {"no_such_arg": 1}})
    with pytest.raises(ValueError, match="no engine argument no_such_arg"):
        engine_args(bad_name, "m", "cpu", "float32")
    bad_value = AnalysisEngineSettings(backend="vllm", vllm={"extra": {"kv_cache_dtype": "fp7"}})
    with pytest.raises(ValueError, match=r"extra\.kv_cache_dtype"):
        engine_args(bad_value, "m", "cpu", "float32")
    # On CPU there is no device memory to take a fraction of: the KV cache is sized.
    cpu = engine_args(AnalysisEngineSettings(backend="vllm"), "m", "cpu", "float32")
    assert cpu.kv_cache_memory_bytes == 2**30 and cpu.enforce_eager


def test_large_model_overlays_size_the_pods(tmp_path):
    single = render("qwen3-vl-235b")
    pod = by_kind(single, "Deployment")["atelier-analysis"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == "atelier-model-cache"
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    assert "atelier-model-cache" in by_kind(single, "PersistentVolumeClaim")
    multi = render("qwen3-vl-235b-multinode")
    driver = by_kind(multi, "Deployment")["atelier-analysis"]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(driver["containers"][0]["resources"])
    env = {e["name"]: e.get("value") for e in driver["containers"][0]["env"]}
    assert env["RAY_ADDRESS"] == "atelier-vllm-head-svc:6379"
    workers = by_kind(multi, "RayCluster")["atelier-vllm"]["spec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == 2
    gpus = workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    config = _analysis_settings("qwen3-vl-235b-multinode", tmp_path)
    assert workers["replicas"] * gpus == \
        config.vllm.tensor_parallel_size * config.vllm.pipeline_parallel_size
