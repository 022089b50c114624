"""``/v1/images/generations`` and ``/v1/images/edits`` <-> GenerateRequest / GenerateResponse.

OpenAI parameters: ``prompt``, ``model``, ``n``, ``size`` (``WIDTHxHEIGHT`` or
``auto``), ``response_format`` (``b64_json``, the default; ``url`` gives a
``data:`` URL, since the gateway hosts no files) and ``output_format``
(``png``, ``jpeg``, ``webp``). atelier's own parameters, passed as extra body
fields (``extra_body`` in the OpenAI SDKs): ``seed``, ``num_inference_steps``,
``guidance_scale``, ``negative_prompt``, ``scheduler``, and for edits
``strength``.

An edit with ``mask`` is inpainting, without it image to image. The mask
follows OpenAI's convention when it has an alpha channel (transparent pixels
are repainted); a mask without alpha follows atelier's (white repaints).
"""

from __future__ import annotations

import base64
import io
import time
from typing import Any

from PIL import Image, UnidentifiedImageError

from atelier.gateway.errors import bad_request
from atelier.v1 import common_pb2, generation_pb2

FORMATS = {"png": common_pb2.IMAGE_FORMAT_PNG, "jpeg": common_pb2.IMAGE_FORMAT_JPEG,
           "webp": common_pb2.IMAGE_FORMAT_WEBP}
MIME = {common_pb2.IMAGE_FORMAT_PNG: "png", common_pb2.IMAGE_FORMAT_JPEG: "jpeg",
        common_pb2.IMAGE_FORMAT_WEBP: "webp"}
#: atelier's extra parameters and their types.
EXTRAS = {"seed": int, "num_inference_steps": int, "guidance_scale": float,
          "negative_prompt": str, "scheduler": str}


def model_name(model: str | None) -> str:
    """An OpenAI model id (``tiny-sd``) as a resource name (``models/tiny-sd``)."""
    if not model:
        return ""
    return model if model.startswith("models/") else f"models/{model}"


def generate_request(body: dict[str, Any], *, edit: bool = False) -> tuple[
        generation_pb2.GenerateRequest, str]:
    """(the GenerateRequest, the response_format) of an images body."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise bad_request("prompt is required", "prompt")
    request = generation_pb2.GenerateRequest(prompt=prompt,
                                             model=model_name(_typed(body, "model", str)))
    n = _typed(body, "n", int)
    if n is not None and n < 1:  # the service reads 0 as its default
        raise bad_request("n must be at least 1", "n")
    request.num_images = 1 if n is None else n
    size = _typed(body, "size", str)
    if size and size != "auto":
        try:
            width, height = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise bad_request("size must be WIDTHxHEIGHT, e.g. 512x512, or auto",
                              "size") from None
        request.width, request.height = width, height
    response_format = _typed(body, "response_format", str) or "b64_json"
    if response_format not in ("b64_json", "url"):
        raise bad_request("response_format must be b64_json or url", "response_format")
    output_format = _typed(body, "output_format", str)
    if output_format:
        if output_format not in FORMATS:
            raise bad_request("output_format must be png, jpeg or webp", "output_format")
        request.output_format = FORMATS[output_format]
    for name, kind in {**EXTRAS, **({"strength": float} if edit else {})}.items():
        value = _typed(body, name, kind)
        if value is not None:
            setattr(request, name, value)
    return request, response_format


def edit_images(request: generation_pb2.GenerateRequest, image: bytes,
                mask: bytes | None) -> None:
    """Put the edit's image (and mask, as atelier's white-repaints mask) on ``request``."""
    request.init_image = image
    if mask is not None:
        request.mask_image = _atelier_mask(mask)


def _atelier_mask(data: bytes) -> bytes:
    try:
        mask = Image.open(io.BytesIO(data))
        mask.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise bad_request("mask is not a readable image", "mask") from None
    if mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info:
        alpha = mask.convert("RGBA").getchannel("A")
        mask = alpha.point(lambda a: 255 if a < 128 else 0)
    buffer = io.BytesIO()
    mask.convert("L").save(buffer, format="PNG")
    return buffer.getvalue()


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


def _typed(body: dict, name: str, kind: type):
    """``body[name]`` as ``kind`` (form fields arrive as text), None when absent."""
    value = body.get(name)
    if value is None or value == "":
        return None
    try:
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError):
        raise bad_request(f"{name} must be {'a number' if kind in (int, float) else 'a string'}"
                          f"{' (an integer)' if kind is int else ''}", name) from None
