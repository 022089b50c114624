"""Decoding images from requests within limits, with errors that name the field.

Both services take encoded images (PNG, JPEG, WEBP and what else Pillow reads).
A request's image is checked from its header before any pixel is decoded, so a
decompression bomb costs microseconds and a field violation, not memory.
"""

from __future__ import annotations

import io

from PIL import Image

from atelier.kit.errors import InvalidArgument

#: Peak bytes per decoded pixel on the way from encoded bytes to model inputs
#: (decode, RGB conversion, the processors' copies), measured at about 16 on a
#: 16-megapixel PNG. Admission budgets use it to price a request before decoding.
DECODE_BYTES_PER_PIXEL = 16

# Refuse decompression bombs ourselves, with a field violation, before PIL would.
Image.MAX_IMAGE_PIXELS = None


def image_pixels(data: bytes) -> int:
    """Width x height from an image's header alone (0 if it has none; decoding
    reports the error later). Reads no pixel data."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:
        return 0
    return width * height


def decode_image(data: bytes, field: str, *, max_bytes: int, max_pixels: int,
                 min_side: int = 1, max_side: int | None = None,
                 mode: str | None = "RGB") -> Image.Image:
    """An image in ``mode`` (None: as decoded) from encoded bytes, or InvalidArgument
    naming ``field``. The size limits are checked from the header, before decoding."""
    if not data:
        raise InvalidArgument.field(field, "is empty")
    if len(data) > max_bytes:
        raise InvalidArgument.field(field, f"is {len(data)} bytes; the limit is {max_bytes}")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise InvalidArgument.field(
                field, f"is {width}x{height} px; the limit is {max_pixels} pixels")
        if max_side is not None and max(width, height) > max_side:
            raise InvalidArgument.field(
                field, f"is {width}x{height} px; each side must be at most {max_side} px")
        if min(width, height) < min_side:
            raise InvalidArgument.field(
                field, f"is {width}x{height} px; each side must be at least {min_side} px")
        image.load()
        return image.convert(mode) if mode else image
    except InvalidArgument:
        raise
    except Exception:
        raise InvalidArgument.field(field, "is not a decodable image") from None


def encode_png(image: Image.Image) -> bytes:
    """An image as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
