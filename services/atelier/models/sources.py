"""Model references: where a service's weights come from.

A reference in config or a request is one of:

- ``tiny://<name>``: a tiny random model built offline into the local cache
  (``stable-diffusion``, ``qwen3-vl``); the embedded default.
- ``store://<prefix>`` or ``s3://<bucket>/<prefix>``: a directory in the object
  store, downloaded once into the local cache (re-downloaded when the stored
  files change), then loaded like a local path. Pickle files are refused:
  weights from the store must be safetensors.
- a local path (absolute, ``./``-relative or existing): loaded as is.
- anything else: a Hugging Face id such as ``org/name``, for deployments with
  network access (``from_pretrained`` fetches it).

Every form ends in the same ``from_pretrained(path_or_id)`` call.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from filelock import FileLock

from atelier.kit.errors import FailedPrecondition, InvalidArgument, NotFound
from atelier.kit.validation import echo
from atelier.storage import ObjectStore, validate_prefix

#: File types that can run code when loaded; refused from the object store.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

Kind = Literal["tiny", "store", "local", "hub"]


@dataclass(frozen=True)
class ModelSource:
    """A parsed reference: ``kind`` and its location (name, prefix, path or hub id)."""

    kind: Kind
    location: str
    bucket: str | None = None


def parse_model_ref(ref: str, field: str = "model") -> ModelSource:
    """Parse ``ref``; raises InvalidArgument naming ``field`` when it is malformed."""
    ref = ref.strip()
    if not ref:
        raise InvalidArgument.field(field, "model reference is empty")
    if ref.startswith("tiny://"):
        return ModelSource("tiny", ref.removeprefix("tiny://"))
    if ref.startswith("store://"):
        return ModelSource("store", validate_prefix(ref.removeprefix("store://").strip("/")))
    if ref.startswith("s3://"):
        bucket, _, prefix = ref.removeprefix("s3://").partition("/")
        if not bucket or not prefix:
            raise InvalidArgument.field(field, "s3 references look like s3://<bucket>/<prefix>")
        return ModelSource("store", validate_prefix(prefix.strip("/")), bucket=bucket)
    if ref.startswith(("/", "./", "../", "~")) or Path(ref).exists():
        return ModelSource("local", str(Path(ref).expanduser()))
    if _HUB_ID.match(ref):
        return ModelSource("hub", ref)
    raise InvalidArgument.field(
        field, f"{echo(ref)} is not a tiny://, store://, s3://, path or hub id")


def resolve_model_ref(
    ref: str, *, cache_dir: Path, store: ObjectStore | None = None, field: str = "model"
) -> str:
    """A local directory (or hub id) that ``from_pretrained`` can load for ``ref``."""
    source = parse_model_ref(ref, field)
    if source.kind == "tiny":
        from atelier.tiny_models.cache import ensure_tiny_model

        try:
            return str(ensure_tiny_model(source.location, cache_dir))
        except KeyError:
            raise NotFound("tiny model", source.location) from None
    if source.kind == "local":
        if not Path(source.location).is_dir():
            raise NotFound("model directory", source.location)
        return source.location
    if source.kind == "hub":
        return source.location
    if store is None:
        raise FailedPrecondition(f"{echo(ref)} needs an object store, and none is configured")
    if source.bucket is not None and source.bucket != store.bucket:
        raise InvalidArgument.field(
            field, f"bucket {echo(source.bucket)} is not the configured bucket {store.bucket!r}"
        )
    return str(download_store_prefix(store, source.location, Path(cache_dir)))


def store_mirror_dir(store: ObjectStore, prefix: str, cache_dir: Path) -> Path:
    """Where :func:`download_store_prefix` mirrors ``prefix`` locally."""
    name = hashlib.sha256(f"{store.describe()}|{prefix}".encode()).hexdigest()[:20]
    return cache_dir / "store" / name


def remove_store_mirror(store: ObjectStore, prefix: str, cache_dir: Path) -> None:
    """Delete the local mirror of ``prefix`` (its model was deleted)."""
    target = store_mirror_dir(store, prefix, cache_dir)
    with FileLock(str(target) + ".lock"):
        shutil.rmtree(target, ignore_errors=True)
    Path(str(target) + ".lock").unlink(missing_ok=True)


def download_store_prefix(store: ObjectStore, prefix: str, cache_dir: Path) -> Path:
    """Mirror ``prefix`` into the cache; reuse the copy while the stored files are unchanged."""
    objects = list(store.list(prefix.rstrip("/") + "/"))
    if not objects:
        raise NotFound("model", f"store://{prefix}")
    pickles = [o.key for o in objects if o.key.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise FailedPrecondition(
            f"model store://{prefix} contains pickle files ({pickles[0]}); only safetensors "
            "weights are loaded from the object store"
        )
    fingerprint = hashlib.sha256(
        "\n".join(f"{o.key}:{o.size}:{o.etag or ''}:{o.last_modified}" for o in objects).encode()
    ).hexdigest()
    target = store_mirror_dir(store, prefix, cache_dir)
    root, name = target.parent, target.name
    root.mkdir(parents=True, exist_ok=True)
    marker = target / ".complete"
    with FileLock(str(target) + ".lock"):
        if marker.exists() and marker.read_text() == fingerprint:
            return target
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-") as tmp:
            staging = Path(tmp) / "model"
            store.download_prefix(prefix, staging)
            (staging / ".complete").write_text(fingerprint)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
    return target
