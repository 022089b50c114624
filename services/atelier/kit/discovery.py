"""Health and server reflection, as every atelier server serves them.

- Health (``grpc.health.v1.Health``): Check, Watch and List. grpcio's asyncio
  servicer has no List, so a List call logged a traceback and answered
  UNIMPLEMENTED; :class:`HealthService` adds it, and ends Watch streams when
  the server drains.
- Reflection, in both versions clients use: ``grpc.reflection.v1`` (grpcurl,
  Postman, current tooling) and ``grpc.reflection.v1alpha`` (older tools).
  grpcio-reflection ships only v1alpha. The two protocols are the same
  messages under another package, so v1 is served by the same servicer, with
  its descriptor registered under the v1 name so that reflection can describe
  itself.

Both are registered like any other service, so the kit's interceptor
authenticates, validates, counts and logs their calls too.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection_pb2 as reflection_v1alpha
from grpc_reflection.v1alpha._async import ReflectionServicer

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


class HealthService(HealthServicer):
    """grpcio's asyncio health servicer plus ``List``, and a ``Watch`` that ends
    when the server drains."""

    async def Watch(self, request, context) -> None:
        """The service's status now, then at every change. Once the server drains,
        the stream ends after its NOT_SERVING is sent: clients' health checking
        leaves this replica, and an open Watch never holds the drain for the whole
        grace period."""
        service = request.service
        condition = self._server_watchers[service]
        self._watcher_count_by_service[service] += 1
        sent = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(
                        service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                    if status != sent:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                        sent = status
                    if self._gracefully_shutting_down:
                        # The drain may have begun while this stream held the lock to
                        # send, before it could set NOT_SERVING: send it here, so no
                        # watcher sees the end of the stream without it.
                        final = health_pb2.HealthCheckResponse.NOT_SERVING
                        if service in self._server_status and sent != final:
                            await context.write(health_pb2.HealthCheckResponse(status=final))
                        return
                    await condition.wait()
        finally:
            self._watcher_count_by_service[service] -= 1
            if not self._watcher_count_by_service[service]:
                del self._server_watchers[service], self._watcher_count_by_service[service]

    async def List(self, request, context) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self._server_status.items()})


def register_reflection_v1() -> None:
    """Add the v1 reflection file to the default descriptor pool (once)."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_v1alpha.DESCRIPTOR.CopyToProto(proto)
    proto.name = _V1_FILE
    proto.package = "grpc.reflection.v1"
    proto.ClearField("options")
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.Add(proto)


def add_reflection(server: grpc.aio.Server, service_names: list[str]) -> list[str]:
    """Serve reflection v1 and v1alpha for ``service_names``; returns their names."""
    register_reflection_v1()
    names = [*service_names, REFLECTION_V1, REFLECTION_V1ALPHA]
    servicer = ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        # Wire-identical messages: v1 bytes parse as the v1alpha types.
        request_deserializer=reflection_v1alpha.ServerReflectionRequest.FromString,
        response_serializer=reflection_v1alpha.ServerReflectionResponse.SerializeToString,
    )
    for name in (REFLECTION_V1, REFLECTION_V1ALPHA):
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler}),))
    return [REFLECTION_V1, REFLECTION_V1ALPHA]
