"""Open the configured object store."""

from __future__ import annotations

from atelier.kit.settings import StorageSettings
from atelier.storage.base import ObjectStore


def open_store(settings: StorageSettings) -> ObjectStore:
    """The backend ``settings.backend`` names, with its bucket ready."""
    if settings.backend == "minio":
        from atelier.storage.minio_backend import MinioStore

        return MinioStore(settings)
    from atelier.storage.local import LocalDirectoryStore

    return LocalDirectoryStore(settings.local_root, settings.bucket)
