"""Typed object-store errors, mapped by the service kit to gRPC codes."""

from __future__ import annotations

from atelier.kit.errors import FieldViolation, InvalidArgument, NotFound, Unavailable


class ObjectNotFound(NotFound):
    """No object under the key (NOT_FOUND)."""

    def __init__(self, key: str) -> None:
        super().__init__("object", key)
        self.key = key


class InvalidObjectKey(InvalidArgument):
    """A key that could escape the bucket or confuse tools (INVALID_ARGUMENT)."""

    def __init__(self, key: str, problem: str, field: str = "key") -> None:
        super().__init__([FieldViolation(field, f"object key {key!r}: {problem}")])
        self.key = key


class StorageError(Unavailable):
    """The store failed after retries (UNAVAILABLE)."""
