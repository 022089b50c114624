"""What the kit refuses before any handler runs, and what its errors send back:
non-finite floats and unknown enum numbers (field paths from the descriptors),
request bytes that do not parse, unbounded echoes, principals per token, and
health and reflection behind the same authentication."""

from __future__ import annotations

import logging
import math

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status

from atelier.kit.validation import request_violations
from atelier.v1 import analysis_pb2, generation_pb2, generation_pb2_grpc, training_pb2
from tests.kit.conftest import make_settings
from tests.kit.test_server import get_model


def violations(err: grpc.RpcError) -> dict[str, str]:
    status = rpc_status.from_call(err)
    out = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.update({v.field: v.description for v in bad.field_violations})
    return out


def test_descriptor_walk_finds_nan_inf_and_unknown_enums_at_their_paths():
    spec = training_pb2.TrainingJobSpec(method=999)
    spec.lora.alpha = math.nan
    spec.options.max_grad_norm = math.inf
    request = analysis_pb2.AnalyzeRequest(task=3)
    frame = request.video.frames.frames.add()
    frame.timestamp_seconds = -math.inf
    request.video.frames.frames.add(timestamp_seconds=1.0)
    found = {v.field for v in request_violations(spec)} | {
        v.field for v in request_violations(request)}
    assert found == {"method", "lora.alpha", "options.max_grad_norm",
                     "video.frames.frames[0].timestamp_seconds"}
    assert request_violations(training_pb2.TrainingJobSpec(method=2, learning_rate=1e-4)) == []


def test_non_finite_floats_and_unknown_enums_are_refused_over_grpc(probe):
    _, channel = probe
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    request = generation_pb2.GenerateStreamRequest(request=generation_pb2.GenerateRequest(
        prompt="x", guidance_scale=math.nan, guidance_rescale=math.inf, output_format=999))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.GenerateStream(request, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(err.value)) == {"request.guidance_scale", "request.guidance_rescale",
                                          "request.output_format"}


def test_malformed_request_bytes_are_invalid_argument_without_a_traceback(probe, caplog):
    _, channel = probe
    raw = channel.unary_unary("/atelier.v1.GenerationService/GetModel",
                              request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
    with caplog.at_level(logging.DEBUG):
        for garbage in (b"\xff\xff\xff\xff", b"\x0a\x05ab"):  # bad tag; truncated string
            with pytest.raises(grpc.RpcError) as err:
                raw(garbage, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "request" in violations(err.value)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_error_messages_do_not_echo_unbounded_input(probe):
    _, channel = probe
    with pytest.raises(grpc.RpcError) as err:
        get_model(channel, "models/echo-" + "x" * 200_000)
    # The real code arrives (not RESOURCE_EXHAUSTED from oversized trailers) and the
    # client would not retry it.
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(err.value.details()) <= 1024
    status = rpc_status.from_call(err.value)
    assert sum(d.ByteSize() for d in status.details) < 2048


def test_each_token_names_its_principal(start_server, tmp_path):
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# principal token\nalice tok-alice\nroot tok-root\nbare-token\n")
    server = start_server(make_settings(auth={"tokens_file": tokens_file,
                                              "admin_principals": ["root"]}))
    with grpc.insecure_channel(server.target) as channel:
        def who(token):
            return get_model(channel, "models/a",
                             metadata=[("authorization", f"Bearer {token}")]).model.display_name
        assert who("tok-alice") == "alice"
        assert who("tok-root") == "root (admin)"
        assert who("bare-token") == "default"
    with grpc.insecure_channel(start_server().target) as channel:  # auth off
        assert get_model(channel, "models/a").model.display_name == "anonymous"


def _list_services(channel, version: str, metadata=()) -> list[str]:
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    replies = call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                   timeout=10, metadata=metadata)
    return [s.name for reply in replies for s in reply.list_services_response.service]


def _describe(channel, symbol: str):
    from google.protobuf import descriptor_pb2

    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    reply = next(iter(call(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol=symbol)]), timeout=10)))
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in reply.file_descriptor_response.file_descriptor_proto]
    return {f.package for f in files}


def test_health_list_and_both_reflection_versions(probe):
    _, channel = probe
    listed = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=5)
    assert listed.statuses["atelier.v1.GenerationService"].status == \
        health_pb2.HealthCheckResponse.SERVING
    for version in ("v1", "v1alpha"):
        names = _list_services(channel, version)
        assert {"atelier.v1.GenerationService", "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection"} <= set(names)
    assert _describe(channel, "grpc.reflection.v1.ServerReflection") == {"grpc.reflection.v1"}
    assert "atelier.v1" in _describe(channel, "atelier.v1.GenerationService")


@pytest.mark.parametrize("reflection_requires_token", [True, False])
def test_health_list_and_reflection_pass_through_auth(start_server, reflection_requires_token):
    server = start_server(make_settings(auth={
        "tokens": ["tok"], "reflection_requires_token": reflection_requires_token}))
    token = [("authorization", "Bearer tok")]
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING  # probes need no token
        with pytest.raises(grpc.RpcError) as err:
            health.List(health_pb2.HealthListRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert health.List(health_pb2.HealthListRequest(), timeout=5, metadata=token).statuses
        for version in ("v1", "v1alpha"):
            assert "atelier.v1.GenerationService" in _list_services(channel, version, token)
            if reflection_requires_token:
                with pytest.raises(grpc.RpcError) as err:
                    _list_services(channel, version)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            else:
                assert "atelier.v1.GenerationService" in _list_services(channel, version)
