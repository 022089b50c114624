"""A request's init image and mask: decoded, checked and preprocessed as the pipelines do.

The image goes through the pipeline's own ``VaeImageProcessor`` (resize to the
output size, scale to [-1, 1]); the mask through the inpainting pipelines' mask
processor (grayscale, binarised at 0.5: 1 repaints). The masked image is the
image where the mask keeps, zero where it repaints.

Decoding and resizing (PIL only) run in helper threads before the request queues
(:func:`resize_inputs`); the tensors are made on the worker thread when the
request starts (:func:`preprocess`). torch ops in a helper thread would give it an
OpenMP team as wide as the machine, and those teams slow every forward of the
worker thread from then on (on 2 cores, text-to-image steps went from about 40 to
60-76 ms after a run of image requests).
"""

from __future__ import annotations

from dataclasses import dataclass

from atelier.generation.job import ImageCondition, ImageInputs, Reference
from atelier.kit.errors import InvalidArgument
from atelier.kit.images import decode_image

#: Default strength by mode, as the SD pipelines' defaults.
IMG2IMG_STRENGTH = 0.8
INPAINT_STRENGTH = 1.0


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_side: int


def output_size(image_size: tuple[int, int], width: int, height: int,
                multiple: int) -> tuple[int, int]:
    """(width, height): the request's, or the image's rounded down to ``multiple``."""
    w, h = image_size
    return width or (w // multiple) * multiple, height or (h // multiple) * multiple


def decode_inputs(init_image: bytes, mask_image: bytes, limits: ImageLimits):
    """The decoded init image (RGB) and mask (grayscale), or InvalidArgument."""
    kwargs = dict(max_bytes=limits.max_bytes, max_pixels=limits.max_side ** 2,
                  max_side=limits.max_side)
    image = decode_image(init_image, "init_image", **kwargs)
    mask = None
    if mask_image:
        mask = decode_image(mask_image, "mask_image", mode="L", **kwargs)
        if mask.size != image.size:
            raise InvalidArgument.field(
                "mask_image", f"is {mask.size[0]}x{mask.size[1]} px; it must be the size of "
                              f"init_image, {image.size[0]}x{image.size[1]} px")
    return image, mask


def _mask_processor(pipe):
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor, do_normalize=False,
                             do_binarize=True, do_convert_grayscale=True)


def resize_inputs(pipe, image, mask, strength: float, width: int, height: int) -> ImageInputs:
    """The images resized to the output size by the pipelines' processors (PIL, no
    torch: safe in a helper thread). ``preprocess`` then finds them at size."""
    image = pipe.image_processor.resize(image.convert("RGB"), height=height, width=width)
    if mask is not None:
        mask = _mask_processor(pipe).resize(mask.convert("L"), height=height, width=width)
    return ImageInputs(image, strength, mask)


def preprocess(pipe, image, mask, strength: float, width: int, height: int) -> ImageCondition:
    """Tensors for the runner, made by the pipelines' own processors. Worker thread."""
    tensor = pipe.image_processor.preprocess(image, height=height, width=width).float()
    if mask is None:
        return ImageCondition(tensor, strength)
    mask_tensor = _mask_processor(pipe).preprocess(mask, height=height, width=width)
    return ImageCondition(tensor, strength, mask_tensor, tensor * (mask_tensor < 0.5))


def reference_inputs(data: list[bytes], limits: ImageLimits, multiple: int,
                     max_pixels: int) -> list[Reference]:
    """Reference images decoded (RGB), checked and scaled down to ``max_pixels`` when
    larger, as the klein pipeline does (its own image processor's checks: at least
    64 px a side, an aspect ratio of at most 8), their size floored to ``multiple``.
    PIL only."""
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    kwargs = dict(max_bytes=limits.max_bytes, max_pixels=limits.max_side ** 2,
                  max_side=limits.max_side)
    out = []
    for i, raw in enumerate(data):
        where = f"reference_images[{i}]"
        image = decode_image(raw, where, **kwargs).convert("RGB")
        try:
            Flux2ImageProcessor.check_image_input(image)
        except ValueError as exc:
            raise InvalidArgument.field(where, str(exc)) from None
        image = Flux2ImageProcessor._resize_if_exceeds_area(image, max_pixels)
        w, h = image.size
        out.append(Reference(image, (w // multiple) * multiple, (h // multiple) * multiple))
    return out


def to_tensor(pipe, reference: Reference):
    """A reference as the pipeline preprocesses it: resized to cover its size and
    centre-cropped, in [-1, 1]. Worker thread."""
    return pipe.image_processor.preprocess(reference.image, height=reference.height,
                                           width=reference.width, resize_mode="crop")
