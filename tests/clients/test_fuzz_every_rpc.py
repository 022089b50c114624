"""Every RPC of the three running services, fuzzed from the message descriptors.

Hypothesis builds requests field by field from each method's input descriptor:
any string, any bytes, any int in the field's range, any float (NaN and
infinities included), any enum number (unknown ones included), nested messages,
repeated fields and oneofs; and, for each method, raw bytes that are no valid
message at all. No call may answer INTERNAL or UNKNOWN (every bad input has a
typed answer), and every service is still SERVING afterwards. The examples and
each call's deadline are bounded, so the test's time is too.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atelier.v1 import analysis_pb2, generation_pb2, training_pb2  # noqa: F401 (descriptors)
from tests.kit.test_server import health

SERVICES = {"training": "atelier.v1.TrainingService",
            "generation": "atelier.v1.GenerationService",
            "analysis": "atelier.v1.AnalysisService"}
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
             grpc.StatusCode.UNIMPLEMENTED}
#: Seconds one fuzzed call may take (a request that happens to be valid may run).
CALL_DEADLINE_S = 5
MAX_DEPTH = 3

_I32, _I64 = (-2**31, 2**31 - 1), (-2**63, 2**63 - 1)
_INTS = {
    FieldDescriptor.TYPE_INT32: _I32, FieldDescriptor.TYPE_SINT32: _I32,
    FieldDescriptor.TYPE_SFIXED32: _I32, FieldDescriptor.TYPE_INT64: _I64,
    FieldDescriptor.TYPE_SINT64: _I64, FieldDescriptor.TYPE_SFIXED64: _I64,
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _scalar(field: FieldDescriptor) -> st.SearchStrategy:
    kind = field.type
    if kind in _INTS:
        low, high = _INTS[kind]
        return st.one_of(st.integers(-3, 300), st.integers(low, high))
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        width = 32 if kind == FieldDescriptor.TYPE_FLOAT else 64
        return st.floats(width=width, allow_nan=True, allow_infinity=True)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.text(max_size=24), st.sampled_from(
            ["models/tiny-sd", "trainingJobs/job-1", "tiny-sd", "sks", "a photo of sks dog",
             "uploads/anonymous/x.png", "../../etc/passwd", "x" * 5000]))
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(numbers), st.integers(-2**31, 2**31 - 1))
    raise AssertionError(f"unhandled field type {kind}")


def message_strategy(descriptor, depth: int = 0) -> st.SearchStrategy:
    """Messages of ``descriptor`` with a random subset of fields set."""
    cls = message_factory.GetMessageClass(descriptor)
    fields = [f for f in descriptor.fields
              if not (f.message_type is not None and f.message_type.GetOptions().map_entry)]

    def value_of(field):
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= MAX_DEPTH or field.message_type.full_name.startswith("google."):
                return st.none()
            return message_strategy(field.message_type, depth + 1)
        return _scalar(field)

    @st.composite
    def build(draw):
        message = cls()
        chosen = draw(st.lists(st.sampled_from(fields), max_size=len(fields), unique=True)) \
            if fields else []
        for field in chosen:
            if field.is_repeated:
                items = draw(st.lists(value_of(field), max_size=3))
                for item in items:
                    if item is None:
                        continue
                    if field.type == FieldDescriptor.TYPE_MESSAGE:
                        getattr(message, field.name).add().CopyFrom(item)
                    else:
                        getattr(message, field.name).append(item)
                continue
            item = draw(value_of(field))
            if item is None:
                continue
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(message, field.name).CopyFrom(item)
            else:
                setattr(message, field.name, item)
        return message

    return build()


def methods():
    pool = descriptor_pool.Default()
    for service_key, name in SERVICES.items():
        for method in pool.FindServiceByName(name).methods:
            yield pytest.param(service_key, method, id=f"{service_key}.{method.name}")


def call(channel, service: str, method, payload: bytes) -> grpc.StatusCode:
    path = f"/{service}/{method.name}"
    identity = lambda data: data  # noqa: E731
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path, request_serializer=identity,
                                          response_deserializer=identity)(
                payload, timeout=CALL_DEADLINE_S)
            for count, _ in enumerate(stream):
                if count >= 3:
                    stream.cancel()
                    break
        else:
            channel.unary_unary(path, request_serializer=identity,
                                response_deserializer=identity)(
                payload, timeout=CALL_DEADLINE_S)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(("service_key", "method"), methods())
def test_no_input_gets_an_untyped_error(local_services, service_key, method):
    service = SERVICES[service_key]
    target = local_services.targets[service_key]
    seen: dict[grpc.StatusCode, int] = {}
    with grpc.insecure_channel(target) as channel:

        @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(request=message_strategy(method.input_type),
               garbage=st.binary(min_size=1, max_size=32))
        def fuzz(request, garbage):
            for payload in (request.SerializeToString(), garbage):
                code = call(channel, service, method, payload)
                seen[code] = seen.get(code, 0) + 1
                assert code not in FORBIDDEN, (code, request)

        fuzz()
        assert health(channel, service) == health_pb2.HealthCheckResponse.SERVING
    assert sum(seen.values()) >= 50
