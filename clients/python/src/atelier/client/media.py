"""Images and videos in and out: file paths, bytes or PIL images to request
messages, and returned images to files or PIL images."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Union

from atelier.v1 import analysis_pb2, common_pb2

#: Anything an image argument accepts: a path, encoded bytes, a PIL image,
#: an object-store reference, or a ready ImageInput.
ImageLike = Union[str, Path, bytes, "PIL.Image.Image", common_pb2.ObjectRef,  # noqa: F821
                  common_pb2.ImageInput]

#: File suffixes the helpers treat as images when given a folder.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

_SUFFIX = {common_pb2.IMAGE_FORMAT_PNG: ".png", common_pb2.IMAGE_FORMAT_JPEG: ".jpg",
           common_pb2.IMAGE_FORMAT_WEBP: ".webp"}


def image_input(image: ImageLike) -> common_pb2.ImageInput:
    """One image as an ImageInput. PIL images are sent as PNG."""
    if isinstance(image, common_pb2.ImageInput):
        return image
    if isinstance(image, common_pb2.ObjectRef):
        return common_pb2.ImageInput(object=image)
    if isinstance(image, bytes | bytearray | memoryview):
        return common_pb2.ImageInput(data=bytes(image))
    if isinstance(image, str | Path):
        return common_pb2.ImageInput(data=Path(image).read_bytes())
    if hasattr(image, "save"):  # a PIL image
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return common_pb2.ImageInput(data=buffer.getvalue())
    raise TypeError(f"not an image: {type(image).__name__} (path, bytes, PIL image, ObjectRef)")


def image_inputs(images: ImageLike | Iterable[ImageLike]) -> list[common_pb2.ImageInput]:
    """Several images; a single image or a folder (its image files, sorted) also works."""
    if isinstance(images, str | Path) and Path(images).is_dir():
        images = images_in(images)
    elif isinstance(images, str | Path | bytes) or hasattr(images, "save") or isinstance(
            images, common_pb2.ImageInput | common_pb2.ObjectRef):
        images = [images]
    return [image_input(image) for image in images]


def images_in(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def video_input(video: str | Path | bytes | common_pb2.ObjectRef, *, fps: float = 0,
                max_frames: int = 0) -> analysis_pb2.VideoInput:
    """A video file (MP4, WebM, ...) or object-store reference as a VideoInput.
    ``fps`` and ``max_frames`` 0 take the server's defaults."""
    if isinstance(video, common_pb2.ObjectRef):
        return analysis_pb2.VideoInput(object=video, fps=fps, max_frames=max_frames)
    data = bytes(video) if isinstance(video, bytes | bytearray) else Path(video).read_bytes()
    return analysis_pb2.VideoInput(data=data, fps=fps, max_frames=max_frames)


def save_images(images: Iterable[common_pb2.EncodedImage], out_dir: str | Path,
                stem: str = "image") -> list[Path]:
    """Write returned images to ``out_dir/<stem>-<i>.<ext>``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = out / f"{stem}-{index}{_SUFFIX.get(image.format, '.png')}"
        path.write_bytes(image.data)
        paths.append(path)
    return paths


def to_pil(image: common_pb2.EncodedImage):
    """A returned image as a PIL image."""
    from PIL import Image

    return Image.open(io.BytesIO(image.data))
