"""The kit's gRPC server, tested with a real server on loopback."""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from atelier.v1 import generation_pb2, generation_pb2_grpc
from tests.kit.conftest import gate, make_settings


def get_model(channel, name, **kwargs):
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    return stub.GetModel(generation_pb2.GetModelRequest(name=name), timeout=10, **kwargs)


def health(channel, service=""):
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def sample(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


def test_health_is_not_serving_until_warmup_finishes(start_server):
    holder, warmup = gate()
    server = start_server(warmup=warmup, wait=False)
    with grpc.insecure_channel(server.target) as channel:
        deadline = time.monotonic() + 10
        while "event" not in holder and time.monotonic() < deadline:
            time.sleep(0.01)
        assert health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health(channel, "atelier.v1.GenerationService") == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        server.loop.call_soon_threadsafe(holder["event"].set)
        server.run(server.server.wait_ready(10))
        assert health(channel) == health_pb2.HealthCheckResponse.SERVING
        assert health(channel, "atelier.v1.GenerationService") == \
            health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            health(channel, "no.such.Service")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_failed_warmup_stays_not_serving(start_server):
    async def warmup():
        raise RuntimeError("model weights missing")

    server = start_server(warmup=warmup, wait=False)
    with pytest.raises(RuntimeError, match="warm-up failed"):
        server.run(server.server.wait_ready(10))
    with grpc.insecure_channel(server.target) as channel:
        assert health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_lists_services(probe):
    _, channel = probe
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {"atelier.v1.GenerationService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= services
    file = db.FindFileContainingSymbol("atelier.v1.GenerationService")
    assert file.name == "atelier/v1/generation.proto"
    assert "atelier/v1/common.proto" in file.dependency


def test_unary_and_stream_calls_work(probe):
    _, channel = probe
    assert get_model(channel, "models/a").model.name == "models/a"
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    events = list(stub.GenerateStream(generation_pb2.GenerateStreamRequest(
        request=generation_pb2.GenerateRequest(num_inference_steps=4)), timeout=10))
    assert [e.progress.step for e in events[:-1]] == [1, 2, 3, 4]
    assert events[-1].HasField("result")


def test_unimplemented_rpc(probe):
    _, channel = probe
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(generation_pb2.GenerateRequest(prompt="x"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_domain_errors_carry_rich_details(probe):
    _, channel = probe
    with pytest.raises(grpc.RpcError) as err:
        get_model(channel, "")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err.value)
    details = {d.type_url.rsplit(".", 1)[-1]: d for d in status.details}
    bad_request = error_details_pb2.BadRequest()
    details["BadRequest"].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == \
        [("name", "is required")]
    info = error_details_pb2.ErrorInfo()
    details["ErrorInfo"].Unpack(info)
    assert info.domain == "atelier" and info.reason == "INVALID_ARGUMENT"

    with pytest.raises(grpc.RpcError) as err:
        get_model(channel, "models/missing")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    resource = error_details_pb2.ResourceInfo()
    next(d for d in rpc_status.from_call(err.value).details if d.Is(resource.DESCRIPTOR)) \
        .Unpack(resource)
    assert resource.resource_name == "models/missing"

    with pytest.raises(grpc.RpcError) as err:
        get_model(channel, "models/busy")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry = error_details_pb2.RetryInfo()
    next(d for d in rpc_status.from_call(err.value).details if d.Is(retry.DESCRIPTOR)) \
        .Unpack(retry)
    assert retry.retry_delay.ToMilliseconds() == 2500


def test_unexpected_exception_is_internal_without_internals(probe, caplog):
    _, channel = probe
    with pytest.raises(grpc.RpcError) as err:
        get_model(channel, "models/crash", metadata=[("x-request-id", "req-42")])
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in err.value.details() and "credentials" not in err.value.details()
    assert "req-42" in err.value.details()
    assert ("x-request-id", "req-42") in err.value.trailing_metadata()
    logged = [r for r in caplog.records if getattr(r, "request_id", None) == "req-42"]
    assert logged and logged[0].code == "INTERNAL" and logged[0].exc_info is not None
    assert "secret detail" in caplog.text  # the log keeps what the client must not see


def test_metrics_scrape(probe):
    server, channel = probe
    get_model(channel, "models/a")
    get_model(channel, "models/b")
    with pytest.raises(grpc.RpcError):
        get_model(channel, "models/missing")
    samples = scrape(server.server.metrics_port)
    base = {"grpc_type": "unary", "grpc_service": "atelier.v1.GenerationService",
            "grpc_method": "GetModel"}
    assert sample(samples, "grpc_server_started_total", **base) == 3
    assert sample(samples, "grpc_server_handled_total", **base, grpc_code="OK") == 2
    assert sample(samples, "grpc_server_handled_total", **base, grpc_code="NOT_FOUND") == 1
    assert sample(samples, "grpc_server_handling_seconds_count", **base) == 3
    assert sample(samples, "grpc_server_handling_seconds_bucket", **base, le="+Inf") == 3
    assert sample(samples, "atelier_grpc_server_in_flight_rpcs",
                  grpc_service="atelier.v1.GenerationService", grpc_method="GetModel") == 0
    # Methods are pre-initialised, so rates exist before traffic.
    assert sample(samples, "grpc_server_started_total", grpc_type="server_stream",
                  grpc_service="atelier.v1.GenerationService",
                  grpc_method="GenerateStream") == 0
    assert sample(samples, "atelier_service_ready", service="probe") == 1
    # Unknown methods must not create label values.
    assert not any(dict(labels).get("grpc_method") == "Nope" for _, labels in samples)


def test_in_flight_gauge_counts_running_calls(probe):
    server, channel = probe
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    future = stub.GetModel.future(generation_pb2.GetModelRequest(name="models/slow-1.5"),
                                  timeout=10)
    labels = {"grpc_service": "atelier.v1.GenerationService", "grpc_method": "GetModel"}
    deadline = time.monotonic() + 5
    value = 0.0
    while time.monotonic() < deadline and value != 1:
        value = sample(scrape(server.server.metrics_port),
                       "atelier_grpc_server_in_flight_rpcs", **labels)
        time.sleep(0.05)
    assert value == 1
    future.result()
    assert sample(scrape(server.server.metrics_port),
                  "atelier_grpc_server_in_flight_rpcs", **labels) == 0


def test_max_message_size_is_configurable(start_server):
    server = start_server(make_settings(grpc={"max_message_bytes": 8 * 1024 * 1024}))
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024),
               ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(server.target, options=options) as channel:
        assert get_model(channel, "models/" + "a" * (6 * 1024 * 1024)).model.name
        with pytest.raises(grpc.RpcError) as err:
            get_model(channel, "models/" + "a" * (9 * 1024 * 1024))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_drain_finishes_in_flight_calls_and_refuses_new_ones(start_server):
    server = start_server()
    channel = grpc.insecure_channel(server.target)
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    slow = stub.GetModel.future(generation_pb2.GetModelRequest(name="models/slow-1.0"),
                                timeout=20)
    time.sleep(0.3)
    stopping = server.submit(server.server.stop(grace=10))
    time.sleep(0.2)
    assert slow.result().model.name == "models/slow-1.0"
    stopping.result(20)
    with pytest.raises(grpc.RpcError) as err:
        get_model(channel, "models/a")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()


def _handled(server, method: str) -> float:
    """Calls of ``method`` the server has answered, by its own metrics."""
    return sum(value for (name, labels), value in scrape(server.server.metrics_port).items()
               if name == "grpc_server_handled_total" and ("grpc_method", method) in labels)


def _set_health(server, status) -> None:
    server.run(server.server.health.set("", status))


def test_health_watch_streams_status_changes(probe):
    """Watch answers the current status at once and then every change (it failed with
    INTERNAL when the interceptor took grpcio's write-style handler for a generator)."""
    server, channel = probe
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "atelier.v1.GenerationService"):
        stream = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=20)
        assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
        stream.cancel()
    stream = stub.Watch(health_pb2.HealthCheckRequest(), timeout=20)
    assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
    _set_health(server, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert next(stream).status == health_pb2.HealthCheckResponse.NOT_SERVING
    _set_health(server, health_pb2.HealthCheckResponse.SERVING)
    assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
    stream.cancel()
    unknown = stub.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=20)
    assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    unknown.cancel()
    assert sample(scrape(server.server.metrics_port), "grpc_server_msg_sent_total",
                  grpc_type="server_stream", grpc_service="grpc.health.v1.Health",
                  grpc_method="Watch") >= 6


def test_client_side_health_checking_leaves_a_not_serving_replica(start_server):
    """Round robin over two replicas with client-side health checking (Watch): both take
    calls while SERVING; once one turns NOT_SERVING every call goes to the other."""
    import json

    first, second = start_server(), start_server()
    config = {"loadBalancingConfig": [{"round_robin": {}}],
              "healthCheckConfig": {"serviceName": ""}}
    targets = ",".join(s.target for s in (first, second))
    with grpc.insecure_channel(f"ipv4:{targets}", options=[
            ("grpc.service_config", json.dumps(config))]) as channel:
        for _ in range(20):
            get_model(channel, "models/a", wait_for_ready=True)
        assert _handled(first, "GetModel") > 0 and _handled(second, "GetModel") > 0
        _set_health(second, health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = time.monotonic() + 20
        while True:  # until the client has seen the change on its Watch stream
            before = _handled(second, "GetModel")
            for _ in range(10):
                get_model(channel, "models/a")
            if _handled(second, "GetModel") == before:
                break
            assert time.monotonic() < deadline, "the NOT_SERVING replica still gets calls"
        served_first, served_second = _handled(first, "GetModel"), _handled(second, "GetModel")
        for _ in range(20):
            get_model(channel, "models/a")
        assert _handled(first, "GetModel") == served_first + 20
        assert _handled(second, "GetModel") == served_second


def test_a_drain_ends_watch_streams_after_not_serving(start_server):
    """An open Watch gets NOT_SERVING when the server drains and then ends with OK: it
    is not left to be cancelled when the grace period runs out."""
    server = start_server()
    with grpc.insecure_channel(server.target) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                          timeout=60)
        assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
        draining = server.submit(server.server.stop(30))
        assert next(stream).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert list(stream) == []
        assert stream.code() == grpc.StatusCode.OK
        draining.result(60)
