"""The object-store interface both backends implement.

Calls are blocking (the minio SDK is); async code calls them through
``asyncio.to_thread``. Writes are atomic per object: a reader sees the old
object or the whole new one, never a partial one.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from atelier.storage.errors import ObjectNotFound
from atelier.storage.keys import join, validate_key, validate_prefix


@dataclass(frozen=True)
class ObjectInfo:
    """Metadata of a stored object. ``size`` in bytes."""

    key: str
    size: int
    last_modified: datetime | None = None
    etag: str | None = None


class ObjectStore(abc.ABC):
    """A flat namespace of keys in one bucket."""

    bucket: str

    # -- primitives each backend implements -------------------------------------------
    @abc.abstractmethod
    def _put_stream(self, key: str, stream: BinaryIO, length: int, content_type: str) -> None: ...

    @abc.abstractmethod
    def _create(self, key: str, data: bytes, content_type: str) -> bool:
        """Write ``data`` only if no object is at ``key``; False if one is (atomic)."""

    @abc.abstractmethod
    def _get_to_file(self, key: str, destination: Path) -> None: ...

    @abc.abstractmethod
    def _get_bytes(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def _stat(self, key: str) -> ObjectInfo: ...

    @abc.abstractmethod
    def _list(self, prefix: str) -> Iterator[ObjectInfo]: ...

    @abc.abstractmethod
    def _delete(self, key: str) -> None: ...

    @abc.abstractmethod
    def describe(self) -> str:
        """A human-readable location, e.g. ``s3://atelier`` or ``file:///data/atelier``."""

    # -- the public API, validating keys once ---------------------------------------
    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        """Store ``data`` under ``key``, replacing any object there."""
        import io

        self._put_stream(validate_key(key), io.BytesIO(data), len(data), content_type)

    def create_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> bool:
        """Store ``data`` under ``key`` only if nothing is stored there: the one
        conditional write, for claiming a name (a job id, a request id, a model id).

        Returns True when this call created the object, False when another object
        was there first. Of concurrent calls on one key exactly one gets True. A
        retried write whose first attempt landed finds its own bytes there and
        also gets True, so callers should make ``data`` unique to the attempt.
        """
        key = validate_key(key)
        if self._create(key, data, content_type):
            return True
        try:
            return self._get_bytes(key) == data
        except ObjectNotFound:  # deleted in between: the name is free again
            return self.create_bytes(key, data, content_type)

    def create_json(self, key: str, value: Any) -> bool:
        """:meth:`create_bytes` of a JSON document."""
        return self.create_bytes(key, json.dumps(value, sort_keys=True, indent=1).encode(),
                                 content_type="application/json")

    def put_file(
        self, key: str, path: Path | str, content_type: str = "application/octet-stream"
    ) -> None:
        """Upload a local file (streamed; multipart on MinIO above the part size)."""
        path = Path(path)
        with path.open("rb") as stream:
            self._put_stream(validate_key(key), stream, path.stat().st_size, content_type)

    def put_json(self, key: str, value: Any) -> None:
        """Store a JSON document (UTF-8, sorted keys)."""
        data = json.dumps(value, sort_keys=True, indent=1).encode()
        self.put_bytes(key, data, content_type="application/json")

    def get_bytes(self, key: str) -> bytes:
        """The object's content. Raises ObjectNotFound."""
        return self._get_bytes(validate_key(key))

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def get_file(self, key: str, destination: Path | str) -> Path:
        """Stream the object into ``destination`` (atomically replaced). Raises ObjectNotFound."""
        destination = Path(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        self._get_to_file(validate_key(key), destination)
        return destination

    def stat(self, key: str) -> ObjectInfo:
        """Size and metadata. Raises ObjectNotFound."""
        return self._stat(validate_key(key))

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, recursively, sorted by key."""
        return self._list(validate_prefix(prefix))

    def delete(self, key: str) -> None:
        """Delete an object. Deleting a missing key raises ObjectNotFound."""
        key = validate_key(key)
        self._stat(key)
        self._delete(key)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; returns how many. Empty prefix refused."""
        if not prefix:
            raise ValueError("refusing to delete the whole bucket")
        count = 0
        for info in list(self.list(prefix)):
            self._delete(info.key)
            count += 1
        return count

    def upload_dir(self, local_dir: Path | str, prefix: str) -> int:
        """Upload every file under ``local_dir`` to ``prefix/<relative path>``."""
        local_dir = Path(local_dir)
        count = 0
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            self.put_file(join(prefix, path.relative_to(local_dir).as_posix()), path)
            count += 1
        return count

    def download_prefix(self, prefix: str, local_dir: Path | str) -> int:
        """Download every object under ``prefix`` into ``local_dir``; returns how many."""
        local_dir = Path(local_dir)
        base = prefix.rstrip("/") + "/"
        count = 0
        for info in self.list(base):
            self.get_file(info.key, local_dir / info.key[len(base):])
            count += 1
        return count
