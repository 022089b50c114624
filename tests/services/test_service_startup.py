"""Each real service starts through the kit, loads its models, and serves health,
reflection and metrics; an RPC with an empty request gets its documented answer
(UNIMPLEMENTED where the service's RPCs are not built yet)."""

from __future__ import annotations

import importlib

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.kit.server_thread import start_app
from tests.kit.test_server import health, sample, scrape

CASES = {
    "training": ("atelier.v1.TrainingService", "ListTrainingJobs", "OK"),
    "generation": ("atelier.v1.GenerationService", "ListModels", "OK"),
    "analysis": ("atelier.v1.AnalysisService", "Analyze", "INVALID_ARGUMENT"),
}


@pytest.mark.parametrize("backend", ["local", "minio"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_service_starts_and_serves_the_kit_surface(request, name, backend, model_cache):
    proto_service, method, expected = CASES[name]
    module = importlib.import_module(f"atelier.{name}.app")
    storage = request.getfixturevalue(f"{backend}_settings")
    thread = start_app(module, storage=storage, model_cache=model_cache, section=name,
                       engine={}, ready_timeout=300)
    try:
        with grpc.insecure_channel(thread.target) as channel:
            assert health(channel, proto_service) == health_pb2.HealthCheckResponse.SERVING
            assert proto_service in ProtoReflectionDescriptorDatabase(channel).get_services()
            call = channel.unary_unary(f"/{proto_service}/{method}",
                                       request_serializer=lambda _: b"",
                                       response_deserializer=bytes)
            try:
                call(None, timeout=10)
                code = "OK"
            except grpc.RpcError as err:
                code = err.code().name
            assert code == expected
        samples = scrape(thread.server.metrics_port)
        assert sample(samples, "grpc_server_handled_total", grpc_type="unary",
                      grpc_service=proto_service, grpc_method=method,
                      grpc_code=expected) == 1
        assert sample(samples, "atelier_service_ready", service=name) == 1
        if backend == "minio":
            from minio import Minio

            client = Minio(storage.endpoint, storage.access_key.get_secret_value(),
                           storage.secret_key.get_secret_value(), secure=False,
                           region=storage.region)
            assert client.bucket_exists(storage.bucket)  # created on start
    finally:
        thread.stop()
