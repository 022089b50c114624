"""Reading the objects that requests name: ObjectRef, checked against its caller.

A request may read only what its caller put there: objects under
``uploads/{principal}/`` (any ``uploads/`` object for an admin), in the
service's own bucket. Job records, instance images, checkpoints, models and
class priors are never readable this way. A reference outside the caller's
prefix is NOT_FOUND, exactly as a missing object, so probing reveals nothing.
"""

from __future__ import annotations

from atelier.kit.auth import Principal
from atelier.kit.errors import FieldViolation, InvalidArgument, NotFound
from atelier.kit.validation import echo
from atelier.storage.base import ObjectStore
from atelier.storage.errors import InvalidObjectKey, ObjectNotFound
from atelier.storage.keys import validate_key

UPLOADS_PREFIX = "uploads/"


def readable_by(principal: Principal, key: str) -> bool:
    """Whether ``principal`` may name ``key`` in a request."""
    prefix = UPLOADS_PREFIX if principal.admin else principal.upload_prefix
    return key.startswith(prefix)


def read_reference(store: ObjectStore, key: str, bucket: str, field: str,
                   principal: Principal) -> bytes:
    """The bytes of a referenced object, or INVALID_ARGUMENT / NOT_FOUND naming ``field``."""
    if bucket and bucket != store.bucket:
        raise InvalidArgument([FieldViolation(f"{field}.bucket",
                                              f"must be empty or {echo(store.bucket)}")])
    try:
        validate_key(key)
    except InvalidObjectKey as exc:
        raise InvalidArgument([FieldViolation(f"{field}.key", exc.violations[0].description)]
                              ) from None
    missing = NotFound("object", key, f"{field}.key: no object {echo(key)}")
    if not readable_by(principal, key):
        raise missing
    try:
        return store.get_bytes(key)
    except ObjectNotFound:
        raise missing from None
