"""The MinIO / S3-compatible backend, on the ``minio`` SDK.

Creates the bucket on start if missing. Uploads larger than the part size go
as multipart uploads (the SDK splits them); downloads stream in 1 MiB chunks.
Transient failures (connection errors, 5xx, SlowDown) are retried with
exponential backoff; a missing key is :class:`ObjectNotFound`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

import urllib3
from minio import Minio
from minio.error import S3Error, ServerError

from atelier.kit.settings import StorageSettings
from atelier.storage.base import ObjectInfo, ObjectStore
from atelier.storage.errors import ObjectNotFound, StorageError

log = logging.getLogger("atelier.storage")

_CHUNK = 1024 * 1024
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NotFound"})
_TRANSIENT_CODES = frozenset(
    {"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout", "OperationAborted",
     "XMinioServerNotInitialized",
     # A conditional write racing another write of the same key (S3): retry it.
     "ConditionalRequestConflict"}
)
T = TypeVar("T")


class MinioStore(ObjectStore):
    """Objects in one bucket of a MinIO / S3-compatible server."""

    def __init__(self, settings: StorageSettings, client: Minio | None = None) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.client = client or Minio(
            settings.endpoint,
            access_key=settings.access_key.get_secret_value(),
            secret_key=settings.secret_key.get_secret_value(),
            secure=settings.secure,
            region=settings.region,
            # The SDK's own pool, but with bounded timeouts; retries are ours,
            # so that a streamed upload can be rewound before it is retried.
            http_client=urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=settings.connect_timeout_s,
                                        read=settings.read_timeout_s),
                maxsize=16,
                retries=False,
            ),
        )
        self._retry(self._ensure_bucket, "ensure bucket")

    def describe(self) -> str:
        scheme = "https" if self.settings.secure else "http"
        return f"s3://{self.bucket} at {scheme}://{self.settings.endpoint}"

    def _ensure_bucket(self) -> None:
        if self.client.bucket_exists(self.bucket):
            return
        try:
            self.client.make_bucket(self.bucket)
            log.info("created bucket", extra={"bucket": self.bucket})
        except S3Error as exc:
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def _retry(self, operation: Callable[[], T], what: str, key: str = "") -> T:
        attempts = self.settings.max_retries + 1
        delay = self.settings.retry_backoff_s
        for attempt in range(1, attempts + 1):
            try:
                return operation()
            except S3Error as exc:
                if exc.code in _MISSING_CODES:
                    raise ObjectNotFound(key) from None
                if exc.code not in _TRANSIENT_CODES or attempt == attempts:
                    raise StorageError(f"object store {what} failed: {exc.code}") from exc
                reason = exc.code
            except (ServerError, urllib3.exceptions.HTTPError, ConnectionError) as exc:
                if attempt == attempts:
                    raise StorageError(f"object store {what} failed after {attempts} attempts") \
                        from exc
                reason = type(exc).__name__
            log.warning("retrying object store operation",
                        extra={"operation": what, "key": key, "attempt": attempt,
                               "reason": reason, "delay_s": delay})
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _put_stream(self, key: str, stream: BinaryIO, length: int, content_type: str) -> None:
        start = stream.tell()

        def upload() -> None:
            stream.seek(start)
            self.client.put_object(
                self.bucket, key, stream, length,
                content_type=content_type, part_size=self.settings.part_size_bytes,
            )

        self._retry(upload, "upload", key)

    def _create(self, key: str, data: bytes, content_type: str) -> bool:
        # S3 conditional writes: PUT with If-None-Match: * fails with 412
        # PreconditionFailed when the key exists (S3, MinIO, and moto in tests).
        # put_object() would send the header as user metadata, so this calls the
        # SDK's single-request PUT; the objects claimed this way are small.
        def upload() -> bool:
            try:
                self.client._put_object(
                    self.bucket, key, data,
                    headers={"If-None-Match": "*", "Content-Type": content_type})
            except S3Error as exc:
                if exc.code == "PreconditionFailed":
                    return False
                raise
            return True

        return self._retry(upload, "conditional upload", key)

    def _get_bytes(self, key: str) -> bytes:
        def download() -> bytes:
            response = self.client.get_object(self.bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._retry(download, "download", key)

    def _get_to_file(self, key: str, destination: Path) -> None:
        def download() -> None:
            response = self.client.get_object(self.bucket, key)
            fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=".download-")
            try:
                with os.fdopen(fd, "wb") as out:
                    for chunk in response.stream(_CHUNK):
                        out.write(chunk)
                os.replace(tmp_name, destination)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
            finally:
                response.close()
                response.release_conn()

        self._retry(download, "download", key)

    def _stat(self, key: str) -> ObjectInfo:
        def stat() -> ObjectInfo:
            st = self.client.stat_object(self.bucket, key)
            return ObjectInfo(key, st.size or 0, st.last_modified, st.etag)

        return self._retry(stat, "stat", key)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        def listing() -> list[ObjectInfo]:
            return [
                ObjectInfo(o.object_name, o.size or 0, o.last_modified, o.etag)
                for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
                if o.object_name is not None and not o.is_dir
            ]

        return iter(sorted(self._retry(listing, "list", prefix), key=lambda o: o.key))

    def _delete(self, key: str) -> None:
        self._retry(lambda: self.client.remove_object(self.bucket, key), "delete", key)
