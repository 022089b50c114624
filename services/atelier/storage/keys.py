"""Object-key rules shared by both backends.

A key is a relative, "/"-separated path of at most 1024 UTF-8 bytes. It may not
be absolute, contain ``.`` or ``..`` segments, empty segments, backslashes or
control characters. The same rules hold on MinIO and on the local directory
store, so a key that works in tests works in production and cannot escape
the bucket directory.
"""

from __future__ import annotations

from atelier.storage.errors import InvalidObjectKey

MAX_KEY_BYTES = 1024


def validate_key(key: str) -> str:
    """Return ``key`` if valid, else raise :class:`InvalidObjectKey`."""
    if not isinstance(key, str) or not key:
        raise InvalidObjectKey(str(key), "must be a non-empty string")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidObjectKey(key[:64] + "...", f"longer than {MAX_KEY_BYTES} bytes")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in key):
        raise InvalidObjectKey(key, "contains control characters")
    if "\\" in key:
        raise InvalidObjectKey(key, "contains a backslash")
    if key.startswith("/"):
        raise InvalidObjectKey(key, "must be relative (no leading '/')")
    if key.endswith("/"):
        raise InvalidObjectKey(key, "must not end with '/'")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidObjectKey(key, "has an empty, '.' or '..' segment")
    return key


def validate_prefix(prefix: str) -> str:
    """Validate a listing prefix: empty, or a key optionally ending in '/'."""
    if prefix == "":
        return prefix
    validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def join(*parts: str) -> str:
    """Join key parts with '/', validating the result."""
    return validate_key("/".join(p.strip("/") for p in parts if p))
