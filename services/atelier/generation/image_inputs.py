"""A request's init image and mask: decoded, checked and preprocessed as the pipelines do.

The image goes through the pipeline's own ``VaeImageProcessor`` (resize to the
output size, scale to [-1, 1]); the mask through the inpainting pipelines' mask
processor (grayscale, binarised at 0.5: 1 repaints). The masked image is the
image where the mask keeps, zero where it repaints. Runs off the event loop,
before the request queues, so the worker thread only encodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from atelier.generation.job import ImageCondition
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


def preprocess(pipe, image, mask, strength: float, width: int, height: int) -> ImageCondition:
    """Tensors for the runner, made by the pipelines' own processors."""
    from diffusers.image_processor import VaeImageProcessor

    tensor = pipe.image_processor.preprocess(image, height=height, width=width).float()
    if mask is None:
        return ImageCondition(tensor, strength)
    mask_processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor,
                                       do_normalize=False, do_binarize=True,
                                       do_convert_grayscale=True)
    mask_tensor = mask_processor.preprocess(mask, height=height, width=width)
    return ImageCondition(tensor, strength, mask_tensor, tensor * (mask_tensor < 0.5))
