"""``/v1/images/generations`` and ``/v1/images/edits`` <-> GenerateRequest / GenerateResponse.

OpenAI parameters: ``prompt``, ``model``, ``n``, ``size`` (``WIDTHxHEIGHT`` or
``auto``), ``response_format`` (``b64_json``, the default; ``url`` gives a
``data:`` URL, since the gateway hosts no files) and ``output_format``
(``png``, ``jpeg``, ``webp``). atelier's own parameters, passed as extra body
fields (``extra_body`` in the OpenAI SDKs): ``seed``, ``num_inference_steps``,
``guidance_scale``, ``negative_prompt``, ``scheduler``, and for edits
``strength``.

An edit with ``mask`` is inpainting, without it image to image. Several images
(``image[]`` parts), or one with ``reference_images=true``, are FLUX.2 [klein]
reference images instead: "this subject, in this scene". The mask
follows OpenAI's convention when it has an alpha channel (transparent pixels
are repainted); a mask without alpha follows atelier's (white repaints).
"""

from __future__ import annotations

import base64
import io
import time
from typing import Any

from PIL import Image, UnidentifiedImageError

from atelier.gateway.bodies import ImagesBody, parse_size
from atelier.gateway.errors import bad_request
from atelier.kit.images import encode_png
from atelier.v1 import common_pb2, generation_pb2

FORMATS = {"png": common_pb2.IMAGE_FORMAT_PNG, "jpeg": common_pb2.IMAGE_FORMAT_JPEG,
           "webp": common_pb2.IMAGE_FORMAT_WEBP}
MIME = {common_pb2.IMAGE_FORMAT_PNG: "png", common_pb2.IMAGE_FORMAT_JPEG: "jpeg",
        common_pb2.IMAGE_FORMAT_WEBP: "webp"}
#: atelier's extra parameters, copied when given.
EXTRAS = ("seed", "num_inference_steps", "guidance_scale", "negative_prompt", "scheduler",
          "strength")


def model_name(model: str | None) -> str:
    """An OpenAI model id (``tiny-sd``) as a resource name (``models/tiny-sd``)."""
    if not model:
        return ""
    return model if model.startswith("models/") else f"models/{model}"


def generate_request(body: ImagesBody) -> generation_pb2.GenerateRequest:
    """The GenerateRequest of a validated images body (or edit form)."""
    request = generation_pb2.GenerateRequest(prompt=body.prompt, model=model_name(body.model),
                                             num_images=body.n)
    size = parse_size(body.size)
    if size is not None:
        request.width, request.height = size
    if body.output_format:
        request.output_format = FORMATS[body.output_format]
    for name in EXTRAS:
        value = getattr(body, name, None)
        if value is not None:
            setattr(request, name, value)
    return request


def checked_image(data: bytes, param: str, max_pixels: int,
                  label: str | None = None) -> Image.Image:
    """``data`` opened as an image whose header says at most ``max_pixels``; nothing is
    decoded yet. 400 naming ``param`` (and ``label`` in the message) otherwise.
    Blocking: call it in a thread."""
    label = label or param
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise bad_request(f"{label} is not a readable image", param) from None
    width, height = image.size
    if width * height > max_pixels:
        raise bad_request(f"{label} is {width}x{height} px; the limit is {max_pixels} pixels",
                          param)
    return image


def edit_images(request: generation_pb2.GenerateRequest, image: bytes,
                mask: bytes | None, max_pixels: int) -> None:
    """Put the edit's image (and mask, as atelier's white-repaints mask) on ``request``,
    after checking their sizes. Blocking (the mask is decoded): call it in a thread."""
    checked_image(image, "image", max_pixels)
    request.init_image = image
    if mask is not None:
        request.mask_image = _atelier_mask(checked_image(mask, "mask", max_pixels))


def reference_images(request: generation_pb2.GenerateRequest, files: list[bytes],
                     max_pixels: int) -> None:
    """Put the images on ``request`` as reference images, after checking their sizes."""
    for i, data in enumerate(files):
        checked_image(data, "image", max_pixels, f"image {i + 1}")
    request.reference_images.extend(files)


def _atelier_mask(mask: Image.Image) -> bytes:
    try:
        mask.load()
    except (OSError, ValueError, Image.DecompressionBombError):
        raise bad_request("mask is not a readable image", "mask") from None
    if mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info:
        alpha = mask.convert("RGBA").getchannel("A")
        mask = alpha.point(lambda a: 255 if a < 128 else 0)
    return encode_png(mask.convert("L"))


def images_response(reply: generation_pb2.GenerateResponse, response_format: str) -> dict:
    data = []
    for image in reply.images:
        encoded = base64.b64encode(image.data).decode()
        if response_format == "url":
            data.append({"url": f"data:image/{MIME.get(image.format, 'png')};base64,{encoded}"})
        else:
            data.append({"b64_json": encoded})
    first = reply.images[0] if reply.images else None
    body: dict[str, Any] = {"created": int(time.time()), "data": data}
    if first is not None:
        body["size"] = f"{first.width}x{first.height}"
        body["output_format"] = MIME.get(first.format, "png")
    return body
