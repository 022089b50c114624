"""The local-directory backend: ``<root>/<bucket>/<key>``. The embedded default."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from atelier.storage.base import ObjectInfo, ObjectStore
from atelier.storage.errors import ObjectNotFound

_CHUNK = 1024 * 1024
_TMP_DIR = ".atelier-tmp"


class LocalDirectoryStore(ObjectStore):
    """Objects as files; writes go to a temp file first, then an atomic rename."""

    def __init__(self, root: Path | str, bucket: str) -> None:
        self.root = Path(root).resolve()
        self.bucket = bucket
        self._dir = self.root / bucket
        self._dir.mkdir(parents=True, exist_ok=True)
        self._tmp = self.root / _TMP_DIR
        self._tmp.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return self._dir.as_uri()

    def _path(self, key: str) -> Path:
        return self._dir / key

    def _writable(self, key: str) -> Path:
        """The file for ``key``, its folder made; a key that is a folder is refused."""
        target = self._path(key)
        if target.is_dir():
            from atelier.storage.errors import InvalidObjectKey

            raise InvalidObjectKey(key, "is a prefix of other objects on the local store")
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def _put_stream(self, key: str, stream: BinaryIO, length: int, content_type: str) -> None:
        target = self._writable(key)
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp)
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(stream, out, _CHUNK)
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def _create(self, key: str, data: bytes, content_type: str) -> bool:
        target = self._writable(key)
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            # A hard link is created atomically and never replaces an existing
            # file: the exclusive create, with the content complete from the start.
            os.link(tmp_name, target)
            return True
        except FileExistsError:
            return False
        finally:
            Path(tmp_name).unlink(missing_ok=True)

    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path

    def _get_bytes(self, key: str) -> bytes:
        return self._existing(key).read_bytes()

    def _get_to_file(self, key: str, destination: Path) -> None:
        source = self._existing(key)
        fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=".download-")
        try:
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                shutil.copyfileobj(src, out, _CHUNK)
            os.replace(tmp_name, destination)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def _stat(self, key: str) -> ObjectInfo:
        st = self._existing(key).stat()
        return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        # Walk only the directory that can hold matches, then filter by prefix.
        start = self._dir / prefix.rpartition("/")[0] if "/" in prefix else self._dir
        if not start.is_dir():
            return iter(())
        keys = sorted(
            p.relative_to(self._dir).as_posix() for p in start.rglob("*") if p.is_file()
        )
        return (self._stat(k) for k in keys if k.startswith(prefix))

    def _delete(self, key: str) -> None:
        path = self._existing(key)
        path.unlink()
        # Prune empty parent directories up to the bucket root.
        parent = path.parent
        while parent != self._dir and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
