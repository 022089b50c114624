"""gRPC failures as Python exceptions that carry the status code and the rich details.

Every call of the atelier clients raises :class:`AtelierRpcError` (or one of its
subclasses, picked by status code) instead of a bare ``grpc.RpcError``. The
google.rpc details the services attach are decoded once: field violations of
INVALID_ARGUMENT, the retry hint of RESOURCE_EXHAUSTED, the ErrorInfo reason,
and the request id to quote when reporting a failure.

    try:
        client.generate("a red fox", width=1000)
    except InvalidArgument as err:
        for violation in err.field_violations:
            print(violation.field, violation.description)   # width  must be a multiple of 8
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

#: The trailing-metadata key under which the services return each call's request id.
REQUEST_ID_HEADER = "x-request-id"


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field: ``field`` is a dotted path such as ``spec.resolution``."""

    field: str
    description: str


class AtelierRpcError(Exception):
    """A call failed. ``code`` is the gRPC status code; ``message`` the server's text.

    ``field_violations``: per-field problems (INVALID_ARGUMENT).
    ``retry_delay``: seconds the server asks the caller to wait (RESOURCE_EXHAUSTED), or None.
    ``reason``/``metadata``: the ErrorInfo the server attached, if any.
    ``resource``: ``(type, name)`` of the missing resource (NOT_FOUND), or None.
    ``request_id``: the id the server logged this call under.
    """

    def __init__(self, code: grpc.StatusCode, message: str, *,
                 field_violations: tuple[FieldViolation, ...] = (),
                 retry_delay: float | None = None, reason: str = "",
                 metadata: dict[str, str] | None = None,
                 resource: tuple[str, str] | None = None, request_id: str = "") -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field_violations = field_violations
        self.retry_delay = retry_delay
        self.reason = reason
        self.metadata = dict(metadata or {})
        self.resource = resource
        self.request_id = request_id or self.metadata.get("request_id", "")


class InvalidArgument(AtelierRpcError):
    """The request is malformed; ``field_violations`` says which fields and why."""


class NotFound(AtelierRpcError):
    """A named model or job does not exist; ``resource`` names it."""


class AlreadyExists(AtelierRpcError):
    """A resource with the requested id exists (and was made by another request)."""


class FailedPrecondition(AtelierRpcError):
    """The resource is not in a state that allows the call (e.g. cancelling a finished job)."""


class ResourceExhausted(AtelierRpcError):
    """The server's queue is full; ``retry_delay`` is its hint, in seconds."""


class Unavailable(AtelierRpcError):
    """The server cannot be reached, is starting, or is draining."""


class DeadlineExceeded(AtelierRpcError):
    """The call's deadline passed before it finished."""


class Unauthenticated(AtelierRpcError):
    """No or a wrong bearer token."""


class PermissionDenied(AtelierRpcError):
    """The token is valid but may not make this call."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def from_rpc_error(error: grpc.RpcError) -> AtelierRpcError:
    """Decode a failed call (sync or asyncio) into the matching AtelierRpcError."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    message = (error.details() if callable(getattr(error, "details", None)) else "") or ""
    violations: list[FieldViolation] = []
    retry_delay = None
    reason, metadata, resource = "", {}, None
    try:
        status = rpc_status.from_call(error)
    except (ValueError, AttributeError, TypeError):
        status = None
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry_delay = info.retry_delay.ToTimedelta().total_seconds()
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            info = error_details_pb2.ResourceInfo()
            detail.Unpack(info)
            resource = (info.resource_type, info.resource_name)
    request_id = ""
    trailing = error.trailing_metadata() if callable(
        getattr(error, "trailing_metadata", None)) else None
    for key, value in trailing or ():
        if key == REQUEST_ID_HEADER:
            request_id = value
    kind = _BY_CODE.get(code, AtelierRpcError)
    return kind(code, message, field_violations=tuple(violations), retry_delay=retry_delay,
                reason=reason, metadata=metadata, resource=resource, request_id=request_id)
