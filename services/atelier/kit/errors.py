"""Domain errors and their mapping to gRPC statuses with google.rpc rich details.

Engines and servicers raise these; the kit's RPC interceptor turns them into a
status code plus details (BadRequest field violations, ErrorInfo, RetryInfo,
ResourceInfo) via grpcio-status. Anything else that escapes a handler becomes
INTERNAL with a message that names only the request id.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

#: ErrorInfo.domain for every error atelier raises.
ERROR_DOMAIN = "atelier"
#: Bounds on what an error sends back, whatever the request held: the status
#: message and its details travel in trailers, and trailers past a client's
#: limit (8-16 KiB) reach it as RESOURCE_EXHAUSTED instead of the real code.
MAX_MESSAGE_CHARS = 1024
MAX_DETAIL_CHARS = 256
MAX_VIOLATIONS = 32


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field: ``field`` is a dotted path (``spec.resolution``)."""

    field: str
    description: str


class AtelierError(Exception):
    """Base of all domain errors; ``code`` picks the gRPC status code.

    ``reason`` is a stable UPPER_SNAKE identifier for ErrorInfo; ``metadata``
    adds string key/values to it. Messages go to clients: keep them free of
    internals (paths, stack traces, credentials).
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})

    def details(self) -> list[any_pb2.Any]:
        """The google.rpc detail messages for this error, packed as Any."""
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN,
            metadata={_cut(k, 64): _cut(v, MAX_DETAIL_CHARS) for k, v in self.metadata.items()},
        )
        return [_pack(info)]

    def to_status(self) -> grpc.Status:
        """The grpc.Status (code, message, trailing rich details) for this error,
        with the message and details cut to bounded sizes."""
        proto = status_pb2.Status(
            code=_CODE_NUMBERS[self.code], message=_cut(self.message, MAX_MESSAGE_CHARS),
            details=self.details(),
        )
        return rpc_status.to_status(proto)


class InvalidArgument(AtelierError):
    """A request field is invalid. Carries one BadRequest.FieldViolation per field."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        violations: Iterable[FieldViolation] | FieldViolation,
        message: str | None = None,
        **kwargs,
    ) -> None:
        if isinstance(violations, FieldViolation):
            violations = [violations]
        self.violations = list(violations)
        if not self.violations:
            raise ValueError("InvalidArgument needs at least one field violation")
        if message is None:
            message = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(message, **kwargs)

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        """Shorthand for a single bad field."""
        return cls([FieldViolation(field, description)])

    def details(self) -> list[any_pb2.Any]:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=_cut(v.field, MAX_DETAIL_CHARS),
                    description=_cut(v.description, MAX_DETAIL_CHARS),
                )
                for v in self.violations[:MAX_VIOLATIONS]
            ]
        )
        return [_pack(bad_request), *super().details()]


class NotFound(AtelierError):
    """A named resource does not exist. Carries ResourceInfo."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"

    def __init__(self, resource_type: str, resource_name: str, message: str | None = None, **kw):
        self.resource_type = resource_type
        self.resource_name = resource_name
        super().__init__(
            message or f"{resource_type} {_cut(repr(resource_name), MAX_DETAIL_CHARS)} not found",
            **kw)

    def details(self) -> list[any_pb2.Any]:
        info = error_details_pb2.ResourceInfo(
            resource_type=self.resource_type,
            resource_name=_cut(self.resource_name, MAX_DETAIL_CHARS),
        )
        return [_pack(info), *super().details()]


class AlreadyExists(AtelierError):
    """The resource to create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(AtelierError):
    """The system is not in a state the operation needs (e.g. cancel a finished job)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class ResourceExhausted(AtelierError):
    """A bounded queue or quota is full. Carries RetryInfo with ``retry_after`` seconds."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kw) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kw)

    def details(self) -> list[any_pb2.Any]:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(self.retry_after * 1e9))
        return [_pack(error_details_pb2.RetryInfo(retry_delay=delay)), *super().details()]


class Cancelled(AtelierError):
    """The caller went away (cancelled or past its deadline) and the work was undone."""

    code = grpc.StatusCode.CANCELLED
    default_reason = "CANCELLED"


class Unauthenticated(AtelierError):
    """Missing or invalid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class Unavailable(AtelierError):
    """The service cannot serve right now (still loading, draining, store down)."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


def internal_status(request_id: str) -> grpc.Status:
    """The status for an unexpected failure: INTERNAL, naming only the request id."""
    proto = status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal error; quote request id {request_id} when reporting it",
        details=[
            _pack(
                error_details_pb2.ErrorInfo(
                    reason="INTERNAL", domain=ERROR_DOMAIN, metadata={"request_id": request_id}
                )
            )
        ],
    )
    return rpc_status.to_status(proto)


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


_CODE_NUMBERS = {code: code.value[0] for code in grpc.StatusCode}
