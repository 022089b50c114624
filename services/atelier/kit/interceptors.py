"""The interceptor every RPC passes through.

For each call to a registered method it: assigns a request id (the client's
``x-request-id`` or a new one), checks the bearer token and sets the caller's
principal, refuses malformed requests and requests with non-finite floats or
unknown enum values (kit/validation.py), counts and times the call in the gRPC
server metrics, maps domain errors to status codes with rich
details, turns unexpected exceptions into INTERNAL without leaking internals,
and writes one structured log line when the call ends.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_status import rpc_status

from atelier.kit.admission import release_free_memory
from atelier.kit.auth import ANONYMOUS, Principal, TokenSet, principal_var
from atelier.kit.errors import AtelierError, InvalidArgument, Unauthenticated, internal_status
from atelier.kit.metrics import RpcMethod, ServerMetrics
from atelier.kit.validation import check_request

log = logging.getLogger("atelier.rpc")

REQUEST_ID_HEADER = "x-request-id"
#: Seconds without any call in flight after which freed memory is returned to the OS.
IDLE_TRIM_S = 1.0
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

#: The request id of the RPC being handled, for engine logs and error details.
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RpcInterceptor(grpc.aio.ServerInterceptor):
    """Request ids, auth, metrics, error mapping and logs for registered methods."""

    def __init__(
        self,
        methods: dict[str, RpcMethod],
        metrics: ServerMetrics,
        tokens: TokenSet,
        auth_exempt: frozenset[str],
        quiet_methods: frozenset[str] = frozenset(),
    ) -> None:
        self._methods = methods
        self._metrics = metrics
        self._tokens = tokens
        self._auth_exempt = auth_exempt
        self._quiet = quiet_methods
        self._calls = 0  # calls in flight, on the event loop's thread
        self._idle_check: asyncio.TimerHandle | None = None

    def call_started(self) -> None:
        self._calls += 1

    def call_ended(self) -> None:
        """When the last call in flight ends, hand freed memory back to the OS once the
        server has stayed idle for IDLE_TRIM_S (so a burst's buffers do not stay
        resident; never during traffic, where trimming would cost latency)."""
        self._calls -= 1
        if self._calls == 0:
            if self._idle_check is not None:
                self._idle_check.cancel()
            self._idle_check = asyncio.get_running_loop().call_later(
                IDLE_TRIM_S, self._trim_if_idle)

    def _trim_if_idle(self) -> None:
        self._idle_check = None
        if self._calls == 0:
            release_free_memory()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        info = self._methods.get(handler_call_details.method)
        if handler is None or info is None:
            # Unknown methods get gRPC's own UNIMPLEMENTED; they are not
            # labelled in metrics, which keeps label values bounded. Every
            # method a server registers (health and reflection included) is in
            # ``methods``, so nothing served passes here unchecked.
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        principal = self._tokens.principal_for(metadata.get("authorization"))
        if principal is None and info.full_name in self._auth_exempt:
            principal = Principal(ANONYMOUS)
        call = _CallFactory(self, info, metadata, principal)
        parse = _tolerant(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                call.unary_response(handler.unary_unary),
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                call.stream_response(handler.unary_stream),
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                call.unary_response(handler.stream_unary, streaming_request=True),
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            call.stream_response(handler.stream_stream, streaming_request=True),
            request_deserializer=parse,
            response_serializer=handler.response_serializer,
        )


class _Malformed:
    """Stands in for a request whose bytes did not parse (see ``_tolerant``)."""


_MALFORMED = _Malformed()


def _tolerant(deserializer):
    """The method's deserializer, returning ``_MALFORMED`` instead of raising: gRPC
    answers a raising deserializer with UNKNOWN and a logged traceback, while a
    request that is not a valid message is the client's INVALID_ARGUMENT."""
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception:
            return _MALFORMED

    return parse


def _checked(request):
    """The request, after the kit's descriptor-driven checks (kit/validation.py)."""
    if request is _MALFORMED:
        raise InvalidArgument.field("request", "is not a valid serialized message")
    check_request(request)
    return request


class _CallFactory:
    """Builds the wrapped behaviour for one call to one method."""

    def __init__(
        self,
        owner: RpcInterceptor,
        info: RpcMethod,
        metadata: dict[str, Any],
        principal: Principal | None,
    ) -> None:
        self.owner = owner
        self.info = info
        self.metadata = metadata
        self.principal = principal  # None: the call is not authenticated

    def unary_response(self, behaviour, streaming_request: bool = False):
        async def handle(request, context: grpc.aio.ServicerContext):
            call = _Call(self, context)
            try:
                request = call.begin(request, streaming_request)
                result = behaviour(request, context)
                if inspect.isawaitable(result):
                    result = await result
                call.sent()
                call.end(grpc.StatusCode.OK)
                return result
            except BaseException as exc:
                await call.fail(exc)

        return handle

    def stream_response(self, behaviour, streaming_request: bool = False):
        if inspect.iscoroutinefunction(behaviour):
            return self.written_response(behaviour, streaming_request)

        async def handle(request, context: grpc.aio.ServicerContext):
            call = _Call(self, context)
            try:
                request = call.begin(request, streaming_request)
                result = behaviour(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        call.sent()
                        yield item
                else:
                    for item in result:
                        call.sent()
                        yield item
                call.end(grpc.StatusCode.OK)
            except BaseException as exc:
                await call.fail(exc)

        return handle

    def written_response(self, behaviour, streaming_request: bool = False):
        """A streaming method whose handler writes with ``context.write`` and returns
        nothing (grpcio's health ``Watch``), rather than yielding. gRPC does not let
        the two styles mix, so the wrapper is a coroutine too, and counts the writes."""
        async def handle(request, context: grpc.aio.ServicerContext):
            call = _Call(self, context)
            try:
                request = call.begin(request, streaming_request)
                await behaviour(request, _CountedWrites(context, call))
                call.end(grpc.StatusCode.OK)
            except BaseException as exc:
                await call.fail(exc)

        return handle


class _CountedWrites:
    """A servicer context whose ``write`` counts each message sent."""

    def __init__(self, context: grpc.aio.ServicerContext, call: _Call) -> None:
        self._context = context
        self._call = call

    async def write(self, message) -> None:
        await self._context.write(message)
        self._call.sent()

    def __getattr__(self, name: str):
        return getattr(self._context, name)


class _Call:
    """Book-keeping of one RPC: metrics, request id, logging, error mapping."""

    def __init__(self, factory: _CallFactory, context: grpc.aio.ServicerContext) -> None:
        self.f = factory
        self.context = context
        self.info = factory.info
        self.metrics = factory.owner._metrics
        self.labels = (self.info.grpc_type, self.info.service, self.info.method)
        self.ended = False
        supplied = str(factory.metadata.get(REQUEST_ID_HEADER, ""))
        self.request_id = supplied if _REQUEST_ID_RE.match(supplied) else uuid.uuid4().hex
        # Read while the call is surely alive: ``peer()`` goes to the gRPC core
        # call, which is gone once the server has stopped, and a response
        # stream abandoned at shutdown is only closed later, by the event loop.
        self.peer = context.peer()
        self.start = time.perf_counter()

    def begin(self, request, streaming_request: bool):
        request_id_var.set(self.request_id)
        if self.f.principal is not None:
            principal_var.set(self.f.principal)
        self.metrics.started.labels(*self.labels).inc()
        self.metrics.in_flight.labels(self.info.service, self.info.method).inc()
        self.f.owner.call_started()
        self.context.set_trailing_metadata(((REQUEST_ID_HEADER, self.request_id),))
        if self.f.principal is None:
            raise Unauthenticated("missing or invalid bearer token")
        if streaming_request:
            return self._count_requests(request)
        self.metrics.msg_received.labels(*self.labels).inc()
        return _checked(request)

    async def _count_requests(self, requests: AsyncIterator) -> AsyncIterator:
        async for item in requests:
            self.metrics.msg_received.labels(*self.labels).inc()
            yield _checked(item)

    def sent(self) -> None:
        self.metrics.msg_sent.labels(*self.labels).inc()

    def end(self, code: grpc.StatusCode, exc: BaseException | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        elapsed = time.perf_counter() - self.start
        code_name = code.name
        self.metrics.handled.labels(*self.labels, code_name).inc()
        self.metrics.handling_seconds.labels(*self.labels).observe(elapsed)
        self.metrics.in_flight.labels(self.info.service, self.info.method).dec()
        self.f.owner.call_ended()
        level = logging.DEBUG if self.info.full_name in self.f.owner._quiet else logging.INFO
        if code == grpc.StatusCode.INTERNAL:
            level = logging.ERROR
        log.log(
            level,
            "rpc finished",
            exc_info=exc if code == grpc.StatusCode.INTERNAL else None,
            extra={
                "request_id": self.request_id,
                "method": self.info.full_name,
                "code": code_name,
                "duration_ms": round(elapsed * 1000, 3),
                "peer": self.peer,
            },
        )

    async def fail(self, exc: BaseException) -> None:
        """Record the outcome of a failed call, then abort with the mapped status or re-raise."""
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            # The client went away or the deadline passed; nothing to send.
            self.end(grpc.StatusCode.CANCELLED)
            raise exc
        if isinstance(exc, grpc.aio.AbortError):
            # The handler aborted with an explicit status through the context.
            self.end(self.context.code() or grpc.StatusCode.UNKNOWN)
            raise exc
        if isinstance(exc, AtelierError):
            status = exc.to_status()
        elif isinstance(exc, NotImplementedError):
            status = rpc_status.to_status(
                _plain_status(grpc.StatusCode.UNIMPLEMENTED, "method not implemented")
            )
        else:
            status = internal_status(self.request_id)
        self.end(status.code, exc)
        await self.context.abort(
            status.code,
            status.details,
            trailing_metadata=(*status.trailing_metadata, (REQUEST_ID_HEADER, self.request_id)),
        )


def _plain_status(code: grpc.StatusCode, message: str):
    from google.rpc import status_pb2

    return status_pb2.Status(code=code.value[0], message=message)
