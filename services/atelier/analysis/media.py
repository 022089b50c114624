"""Decoding images and videos from requests, within the configured limits.

Every failure names the item: ``images[2]``, ``video`` or ``video.frames[3]``,
so clients can tell which input to fix. Videos are sampled at a bounded fps and
frame count; a clip shorter than the sampling window simply yields fewer
frames (at least one), which is not an error.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from atelier.analysis.config import AnalysisEngineSettings
from atelier.kit import images as kit_images
from atelier.kit.errors import FieldViolation, InvalidArgument


def video_pixels(data: bytes, max_frames: int) -> int:
    """Pixels of the frames that sampling may keep, from the container header."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                return 0
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
    except Exception:
        return 0
    return width * height * max_frames


@dataclass
class DecodedVideo:
    """Sampled frames (T, H, W, 3) uint8 and their presentation times in seconds."""

    frames: np.ndarray
    timestamps: list[float]


def decode_image(data: bytes, field: str, limits: AnalysisEngineSettings) -> Image.Image:
    """An RGB image from encoded bytes, or InvalidArgument naming ``field``."""
    return kit_images.decode_image(data, field, max_bytes=limits.max_image_bytes,
                                   max_pixels=limits.max_image_pixels,
                                   min_side=limits.min_image_side)


def decode_video(data: bytes, fps: float, max_frames: int, field: str,
                 limits: AnalysisEngineSettings) -> DecodedVideo:
    """Sample frames from an encoded video at ``fps``, at most ``max_frames``."""
    import av

    if not data:
        raise InvalidArgument.field(field, "is empty")
    if len(data) > limits.max_video_bytes:
        raise InvalidArgument.field(
            field, f"is {len(data)} bytes; the limit is {limits.max_video_bytes}")
    frames: list[np.ndarray] = []
    times: list[float] = []
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise InvalidArgument.field(field, "has no video stream")
            stream = container.streams.video[0]
            next_time = 0.0
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                if frame.time + 1e-6 >= next_time:
                    image = frame.to_ndarray(format="rgb24")
                    if image.shape[0] * image.shape[1] > limits.max_image_pixels:
                        raise InvalidArgument.field(field, "frames are too large")
                    frames.append(image)
                    times.append(float(frame.time))
                    next_time = frame.time + 1.0 / fps
                    if len(frames) >= max_frames:
                        break
    except InvalidArgument:
        raise
    except Exception:
        raise InvalidArgument.field(field, "is not a decodable video") from None
    if not frames:
        raise InvalidArgument.field(field, "has no decodable frames")
    return DecodedVideo(np.stack(frames), times)


def frames_to_video(images: list[Image.Image], timestamps: list[float],
                    field: str) -> DecodedVideo:
    """Timestamped frames given as images (all resized to the first frame's size)."""
    bad = [FieldViolation(f"{field}[{i}].timestamp_seconds", "must not decrease")
           for i in range(1, len(timestamps)) if timestamps[i] < timestamps[i - 1]]
    bad += [FieldViolation(f"{field}[{i}].timestamp_seconds", "must not be negative")
            for i, t in enumerate(timestamps) if t < 0]
    if bad:
        raise InvalidArgument(bad)
    size = images[0].size
    arrays = [np.asarray(img.resize(size) if img.size != size else img) for img in images]
    return DecodedVideo(np.stack(arrays), list(timestamps))
