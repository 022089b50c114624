"""The object store: checkpoints, models, instance images, class priors, job records.

Two backends behind one interface (:class:`ObjectStore`): MinIO / any
S3-compatible server through the ``minio`` SDK, and a local directory for
embedded runs. :func:`open_store` picks one from :class:`StorageSettings`.
"""

from atelier.storage.base import ObjectInfo, ObjectStore
from atelier.storage.errors import InvalidObjectKey, ObjectNotFound, StorageError
from atelier.storage.factory import open_store
from atelier.storage.keys import validate_key, validate_prefix

__all__ = [
    "InvalidObjectKey",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "StorageError",
    "open_store",
    "validate_key",
    "validate_prefix",
]
